"""The two pieces every top-k loss is built from: the teacher's k+1 buckets (its cached top-k and one tail
bucket, renormalised) and the KL term a (log a - log b) with 0 log 0 = 0. The same-tokenizer kinds
(losses.py) and the cross-tokenizer kinds (xtok_losses.py) both import them from here; notation as losses.py's."""

from __future__ import annotations

import torch
from torch import Tensor


def teacher_buckets(topk_logprobs: Tensor, tail_logmass: Tensor, dtype: torch.dtype) -> Tensor:
    """log p on the k+1 buckets: (..., k) and (...) -> (..., k + 1), renormalised to sum to 1.

    Stored F16/BF16 log-probs may miss 1 by up to 3e-2 (SPEC.md); renormalising keeps every divergence a
    divergence between distributions (for F32 caches it changes nothing beyond rounding).
    """
    b = torch.cat([topk_logprobs.to(dtype), tail_logmass.to(dtype)[..., None]], dim=-1)
    return b - torch.logsumexp(b, dim=-1, keepdim=True)


def kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """a * (log a - log b) elementwise, 0 where a = 0 (0 log 0 = 0); no NaN in value or gradient there."""
    zero = torch.isneginf(log_a)
    log_a = log_a.masked_fill(zero, 0.0)
    return torch.where(zero, 0.0, log_a.exp() * (log_a - log_b))
