"""Distillation losses, one per KD kind: student logits against the teacher fields a kdcache cache stores
(formats/SPEC.md), each as a per-position row function and as a public loss (mean over masked positions).
The CE/KD mix is student_trainer/kd_mix.py, the output-head loss in chunks head_loss.py, hidden-state
alignment hidden_align.py.

Notation (docstrings and shape comments)
    B  batch (sequences)              T  positions per sequence       V  vocabulary (student logits)
    k  cached top-k entries           S  RS-KD sample slots           H  student hidden size (H_t: teacher's)
    N  RS-KD draws per position       K  the set of top-k ids at one position; "tail" = every other id
    p  teacher distribution           q  student distribution, softmax(logits / temperature)
    log1mexp(x) = log(1 - exp(x))

Conventions shared by every loss here
- Student logits are (B, T, V) in any dtype; the math runs in float32 (float64 stays float64), in log space.
- Teacher fields come as stored: topk_ids (B, T, k) int, topk_logprobs (B, T, k) float (any float dtype),
  tail_logmass (B, T) = log(1 - sum_K p), sample_ids / sample_counts (B, T, S) padded with -1 / 0.
- mask (B, T), bool or float: the positions that count. The trainer builds it: it drops the last position of
  each sequence (no next token) and padding, and multiplies in loss_mask. A float mask weights positions.
- labels (B, T): the real next-token ids for the CE term; -100 is ignored.
- Reduction: the (weighted) mean over masked positions. A batch with nothing masked in returns exactly 0.0
  with an all-zero gradient, never NaN. Masked-out positions may hold anything (NaN, id -1): their teacher
  fields are replaced by harmless values before any arithmetic, so they reach neither value nor gradient.

Tail assumptions
- Only forward KL is exact from a teacher-side cache. The "ghost bucket" losses (fkl_ghost, rkl, jsd, skew_kl,
  tvd) compare p and q on the (k+1)-bucket coarsening {each id in K, the tail}: the student's tail is
  q_tail = 1 - sum_K q; the teacher's buckets (exp(topk_logprobs), exp(tail_logmass)) are renormalised to sum
  to 1, which absorbs the rounding of F16/BF16 log-probs. Any f-divergence (KL either way, JSD, skew KL, TVD)
  of a coarsening is a lower bound of the full divergence (data-processing inequality). fkl_ghost's gradient
  w.r.t. logits in K is exactly the full KL's, q_i - p_i; in the tail it is q_j - p_tail * q_j / q_tail.
- fkl_renorm restricts both p and q to K and renormalises: no signal in the tail (the student learns
  p_i / sum_K p_j there).
- rskd needs no assumption: it is an unbiased estimate of full forward KL (up to a q-independent constant).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from student_trainer.batch import IGNORE_INDEX
from student_trainer.buckets import kl_terms, teacher_buckets
from student_trainer.xtok_losses import XTOK_LOSSES

# Reverse KL divides by p: a bucket the teacher gives no mass (tail_logmass = -inf, or an F16 log-prob that
# underflowed) would make it infinite. Such buckets are floored at the smallest normal float32.
RKL_LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)  # about -87.3


# ---------------------------------------------------------------------------------------------- helpers


def upcast(x: Tensor) -> Tensor:
    """float32, or float64 when it already is (the reference tests run in float64)."""
    return x if x.dtype == torch.float64 else x.float()


def position_weights(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, T) weights whose weighted sum is the mean over masked positions; all zero when nothing is masked in."""
    w = mask.to(dtype)
    total = w.sum()
    return w / torch.where(total > 0, total, 1.0)


def weighted_sum(rows: Tensor, weights: Tensor) -> Tensor:
    """sum_t w_t * rows_t, taking only positions with w_t > 0 (a NaN elsewhere cannot leak in)."""
    return torch.where(weights > 0, rows * weights, 0.0).sum()


def masked_mean(rows: Tensor, mask: Tensor) -> Tensor:
    return weighted_sum(rows, position_weights(mask, rows.dtype))


def clean_fields(mask: Tensor, **fields: Tensor | None) -> dict[str, Tensor | None]:
    """Teacher fields with masked-out positions replaced by harmless values (id 0, log-prob 0, count 0)."""
    m = mask > 0 if mask.is_floating_point() else mask.bool()  # (B, T)
    out: dict[str, Tensor | None] = {}
    for name, x in fields.items():
        if x is None:
            out[name] = None
        elif name == "sample_ids":
            out[name] = torch.where(m[..., None] & (x >= 0), x, 0).long()
        elif name == "sample_counts":
            valid = m[..., None] & (fields["sample_ids"] >= 0)
            out[name] = torch.where(valid, x.to(torch.float64), 0.0)  # uint16 counts: widen before anything else
        elif name == "labels":
            out[name] = torch.where(m & (x != IGNORE_INDEX), x, IGNORE_INDEX).long()
        elif name == "topk_ids":
            out[name] = torch.where(m[..., None], x, 0).long()
        else:  # topk_logprobs (B, T, k), tail_logmass (B, T)
            out[name] = torch.where(m if x.dim() == m.dim() else m[..., None], x, 0.0)
    return out


def _student_buckets(z: Tensor, topk_ids: Tensor) -> Tensor:
    """log q on the k+1 buckets: the top-k ids, then the tail. z (..., V) -> (..., k + 1).

    The tail is logsumexp over the logits outside K minus logsumexp over all of them (K's logits replaced by
    the most negative finite float). That is more accurate than log1mexp(logsumexp_K log q) when the student
    is confident: the latter subtracts two numbers near 1 and has an absolute error of ~1e-6 in float32, and
    its gradient is infinite once sum_K q rounds to 1. With k = V the tail comes out as a huge finite negative
    number, so no NaN appears anywhere.
    """
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (..., 1)
    outside = z.scatter(-1, topk_ids, torch.finfo(z.dtype).min)  # (..., V)
    log_tail = torch.logsumexp(outside, dim=-1, keepdim=True)  # (..., 1)
    return torch.cat([z.gather(-1, topk_ids), log_tail], dim=-1) - lse  # (..., k + 1)


def retemper(topk_logprobs: Tensor, tail_logmass: Tensor, ratio: float) -> tuple[Tensor, Tensor]:
    """Teacher log-probs captured at temperature T_c, moved to temperature T: ratio = T_c / T.

    p_T(i) = p(i)^ratio / Z with Z = sum_K p(j)^ratio + p_tail^ratio (the tail treated as one token).
    On K, renormalised, this is exact: p restricted to K at temperature T is proportional to p^ratio.
    The tail is approximate: the true tempered tail is sum_{j not in K} p(j)^ratio, which is >= p_tail^ratio
    when ratio < 1 (T > T_c, so the tail is underestimated) and <= when ratio > 1. Shapes as given; float32.
    """
    b = teacher_buckets(topk_logprobs, tail_logmass, torch.promote_types(topk_logprobs.dtype, torch.float32))
    b = b * ratio  # (..., k + 1)
    b = b - torch.logsumexp(b, dim=-1, keepdim=True)  # (..., k + 1)
    return b[..., :-1], b[..., -1]


# ------------------------------------------------------------------------- per-position losses (..., V) -> (...)


def _fkl_ghost_rows(z: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor) -> Tensor:
    t = teacher_buckets(topk_logprobs, tail_logmass, z.dtype)
    return kl_terms(t, _student_buckets(z, topk_ids)).sum(-1)


def _fkl_renorm_rows(z: Tensor, topk_ids: Tensor, topk_logprobs: Tensor) -> Tensor:
    t = topk_logprobs.to(z.dtype)
    t = t - torch.logsumexp(t, dim=-1, keepdim=True)  # (..., k)
    s = z.gather(-1, topk_ids)
    s = s - torch.logsumexp(s, dim=-1, keepdim=True)  # (..., k)
    return kl_terms(t, s).sum(-1)


def _rskd_rows(z: Tensor, sample_ids: Tensor, sample_counts: Tensor) -> Tensor:
    c = sample_counts.to(z.dtype)  # (..., S)
    p_hat = c / c.sum(-1, keepdim=True).clamp_min(1.0)
    log_q = z.gather(-1, sample_ids) - torch.logsumexp(z, dim=-1, keepdim=True)  # (..., S)
    return kl_terms(p_hat.log(), log_q).sum(-1)


def _rkl_rows(z: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor) -> Tensor:
    t = teacher_buckets(topk_logprobs, tail_logmass, z.dtype).clamp_min(RKL_LOG_FLOOR)
    return kl_terms(_student_buckets(z, topk_ids), t).sum(-1)


def _jsd_rows(z: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor, beta: float) -> Tensor:
    if beta == 0.0:
        return _fkl_ghost_rows(z, topk_ids, topk_logprobs, tail_logmass)
    if beta == 1.0:
        return _rkl_rows(z, topk_ids, topk_logprobs, tail_logmass)
    t = teacher_buckets(topk_logprobs, tail_logmass, z.dtype)
    s = _student_buckets(z, topk_ids)
    log_m = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))  # (..., k + 1)
    return beta * kl_terms(t, log_m).sum(-1) + (1.0 - beta) * kl_terms(s, log_m).sum(-1)


def _skew_kl_rows(z: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor, skew: float) -> Tensor:
    if skew == 0.0:
        return _fkl_ghost_rows(z, topk_ids, topk_logprobs, tail_logmass)
    t = teacher_buckets(topk_logprobs, tail_logmass, z.dtype)
    s = _student_buckets(z, topk_ids)
    log_m = torch.logaddexp(t + math.log(skew), s + math.log1p(-skew))  # (..., k + 1)
    return kl_terms(t, log_m).sum(-1)


def _tvd_rows(z: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor) -> Tensor:
    t = teacher_buckets(topk_logprobs, tail_logmass, z.dtype)
    return 0.5 * (t.exp() - _student_buckets(z, topk_ids).exp()).abs().sum(-1)


def ce_rows(z: Tensor, labels: Tensor) -> Tensor:
    """-log q(label); 0 where the label is -100."""
    safe = labels.clamp_min(0)[..., None]
    nll = torch.logsumexp(z, dim=-1) - z.gather(-1, safe)[..., 0]
    return torch.where(labels == IGNORE_INDEX, 0.0, nll)


# ------------------------------------------------------------------------------------- public per-kind losses


def fkl_ghost(logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor, mask: Tensor) -> Tensor:
    """Forward KL on the top-k plus a ghost bucket for the tail (Megatron offline KD, TRL's default).

        loss_t = sum_{i in K} p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)
        log p_tail = tail_logmass,   log q_tail = log(1 - sum_{i in K} q_i)   (computed as in `_student_buckets`)

    Tail: the tail is one bucket on both sides. The value is the KL of the (k+1)-bucket coarsening, a lower bound
    of the full KL(p || q), equal to it when k = V. logits (B, T, V), topk_* (B, T, k), tail_logmass (B, T),
    mask (B, T). Returns the mean over masked positions, a scalar.
    """
    f = clean_fields(mask, topk_ids=topk_ids, topk_logprobs=topk_logprobs, tail_logmass=tail_logmass)
    return masked_mean(_fkl_ghost_rows(upcast(logits), **f), mask)


def fkl_renorm(logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Forward KL between p and q both restricted to K and renormalised.

        p~_i = p_i / sum_{j in K} p_j,   q~_i = q_i / sum_{j in K} q_j   (i in K)
        loss_t = sum_{i in K} p~_i (log p~_i - log q~_i)

    Tail: ignored on both sides; the student gets no signal about mass outside K (biased, see FACTS.md).
    Not DistillKit's default, which renormalises the teacher only (p~ above against q over all V): that one is
    `fkl_ghost` with tail_logmass = -inf.
    logits (B, T, V), topk_* (B, T, k), mask (B, T). Returns the mean over masked positions.
    """
    f = clean_fields(mask, topk_ids=topk_ids, topk_logprobs=topk_logprobs)
    return masked_mean(_fkl_renorm_rows(upcast(logits), **f), mask)


def rskd(logits: Tensor, sample_ids: Tensor, sample_counts: Tensor, mask: Tensor) -> Tensor:
    """RS-KD (Anshumann et al., 2025): forward KL against the empirical distribution of N teacher draws.

        p^_i = c_i / N  (N = sum_s c_s, the draws at that position),   log q = log_softmax(logits) over all V
        loss_t = sum_{s: c_s > 0} p^_s (log p^_s - log q_{id_s})

    Unbiased: the gradient w.r.t. the logits is q - p^ and E[p^] = p, so E[grad] = q - p, the gradient of the
    full KL(p || q). The value's expectation is KL(p || q) + H(p) - E[H(p^)]: full forward KL plus a constant
    that does not depend on q. Tail: none needed. Padding slots (id -1, count 0) and positions with no draws
    contribute 0. logits (B, T, V), sample_* (B, T, S), mask (B, T). Returns the mean over masked positions.
    """
    f = clean_fields(mask, sample_ids=sample_ids, sample_counts=sample_counts)
    return masked_mean(_rskd_rows(upcast(logits), **f), mask)


def rkl(logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor, mask: Tensor) -> Tensor:
    """Reverse KL on the (k+1)-bucket coarsening (ghost-bucket tail).

        loss_t = sum_{b in K + tail} q_b (log q_b - max(log p_b, RKL_LOG_FLOOR))

    Tail: one bucket on both sides, so the value is a lower bound of the full KL(q || p): the cache cannot say
    how the teacher's tail mass is spread, and reverse KL is not linear in p, so no unbiased estimate exists.
    A teacher bucket with zero mass is floored at log-prob RKL_LOG_FLOOR (~ -87.3) instead of being infinite.
    Shapes as `fkl_ghost`. Returns the mean over masked positions.
    """
    f = clean_fields(mask, topk_ids=topk_ids, topk_logprobs=topk_logprobs, tail_logmass=tail_logmass)
    return masked_mean(_rkl_rows(upcast(logits), **f), mask)


def jsd(
    logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor, mask: Tensor, beta: float = 0.5
) -> Tensor:
    """Generalised Jensen-Shannon divergence (TRL GKD) on the (k+1)-bucket coarsening.

        M = beta p + (1 - beta) q,   loss_t = beta KL(p || M) + (1 - beta) KL(q || M)   (over the k+1 buckets)

    The endpoints follow TRL: beta = 0 is forward KL (`fkl_ghost`), beta = 1 is reverse KL (`rkl`); the formula
    itself tends to 0 there, so the loss jumps at the endpoints. Tail: one bucket on both sides; the value is a
    lower bound of the full JSD. Shapes as `fkl_ghost`. Returns the mean over masked positions.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd: beta must be in [0, 1], got {beta}")
    f = clean_fields(mask, topk_ids=topk_ids, topk_logprobs=topk_logprobs, tail_logmass=tail_logmass)
    return masked_mean(_jsd_rows(upcast(logits), **f, beta=beta), mask)


def skew_kl(
    logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor, mask: Tensor, skew: float = 0.1
) -> Tensor:
    """Skew forward KL (DistiLLM) on the (k+1)-bucket coarsening.

        loss_t = KL(p || skew p + (1 - skew) q) = sum_b p_b (log p_b - log(skew p_b + (1 - skew) q_b))

    skew = 0 is forward KL (`fkl_ghost`); the mixture keeps the loss bounded (by -log skew) as q_b -> 0.
    Tail: one bucket on both sides; the value is a lower bound of the full skew KL. Shapes as `fkl_ghost`.
    Returns the mean over masked positions.
    """
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew_kl: skew must be in [0, 1), got {skew}")
    f = clean_fields(mask, topk_ids=topk_ids, topk_logprobs=topk_logprobs, tail_logmass=tail_logmass)
    return masked_mean(_skew_kl_rows(upcast(logits), **f, skew=skew), mask)


def tvd(logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor, mask: Tensor) -> Tensor:
    """Total variation distance on the (k+1)-bucket coarsening.

        loss_t = 1/2 sum_{b in K + tail} |p_b - q_b|

    Tail: one bucket on both sides; the value is a lower bound of the full TVD (masses of opposite sign inside
    the tail cancel). Shapes as `fkl_ghost`. Returns the mean over masked positions.
    """
    f = clean_fields(mask, topk_ids=topk_ids, topk_logprobs=topk_logprobs, tail_logmass=tail_logmass)
    return masked_mean(_tvd_rows(upcast(logits), **f), mask)


def cross_entropy(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Cross-entropy on the real next token: loss_t = -log q(labels_t), q = softmax(logits) over all V.

    logits (B, T, V), labels (B, T) with -100 ignored, mask (B, T). Returns the mean over positions that are
    masked in and have a label.
    """
    f = clean_fields(mask, labels=labels)
    return masked_mean(ce_rows(upcast(logits), f["labels"]), f["labels"] != IGNORE_INDEX)


# ------------------------------------------------------------------------------------------- kinds by name

# kind -> per-position loss of student logits z (..., V) and the cleaned teacher fields f; c is the KDConfig
# (student_trainer/kd_mix.py: jsd reads its beta, skew_kl its skew). Its keys are settings.KD_KINDS (tested).
KD_LOSSES: dict[str, Callable[[Tensor, dict, Any], Tensor]] = {
    "fkl_ghost": lambda z, f, c: _fkl_ghost_rows(z, f["topk_ids"], f["topk_logprobs"], f["tail_logmass"]),
    "fkl_renorm": lambda z, f, c: _fkl_renorm_rows(z, f["topk_ids"], f["topk_logprobs"]),
    "rskd": lambda z, f, c: _rskd_rows(z, f["sample_ids"], f["sample_counts"]),
    "rkl": lambda z, f, c: _rkl_rows(z, f["topk_ids"], f["topk_logprobs"], f["tail_logmass"]),
    "jsd": lambda z, f, c: _jsd_rows(z, f["topk_ids"], f["topk_logprobs"], f["tail_logmass"], c.beta),
    "skew_kl": lambda z, f, c: _skew_kl_rows(z, f["topk_ids"], f["topk_logprobs"], f["tail_logmass"], c.skew),
    "tvd": lambda z, f, c: _tvd_rows(z, f["topk_ids"], f["topk_logprobs"], f["tail_logmass"]),
    **XTOK_LOSSES,  # uld, byte_align: a student with another tokenizer (its topk_ids are student ids, xtok_align.py)
}
_GHOST_FIELDS = ("topk_ids", "topk_logprobs", "tail_logmass")
# kind -> the teacher fields its loss reads.
KD_FIELDS = {kind: _GHOST_FIELDS for kind in KD_LOSSES} | {
    "fkl_renorm": ("topk_ids", "topk_logprobs"),
    "rskd": ("sample_ids", "sample_counts"),
}
