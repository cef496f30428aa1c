"""Distillation losses: student logits against the teacher fields a kdcache cache stores (formats/SPEC.md).

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

Memory: `chunked_kd_loss` takes the student's final hidden states and the output embedding instead of logits,
computes logits a chunk of tokens at a time and recomputes them in backward, so (B, T, V) float32 logits never
exist at once. It is tested equal to `kd_loss` on the full logits.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from student_trainer.xtok_losses import XTOK_LOSSES

IGNORE_INDEX = -100
# Reverse KL divides by p: a bucket the teacher gives no mass (tail_logmass = -inf, or an F16 log-prob that
# underflowed) would make it infinite. Such buckets are floored at the smallest normal float32.
RKL_LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)  # about -87.3


class RetemperWarning(UserWarning):
    """Teacher log-probs were re-tempered to a temperature other than the capture temperature (approximate)."""


# ---------------------------------------------------------------------------------------------- helpers


def _upcast(x: Tensor) -> Tensor:
    """float32, or float64 when it already is (the reference tests run in float64)."""
    return x if x.dtype == torch.float64 else x.float()


def _kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """a * (log a - log b) elementwise, 0 where a = 0 (0 log 0 = 0); no NaN in value or gradient there."""
    zero = torch.isneginf(log_a)
    log_a = log_a.masked_fill(zero, 0.0)
    return torch.where(zero, 0.0, log_a.exp() * (log_a - log_b))


def _position_weights(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, T) weights whose weighted sum is the mean over masked positions; all zero when nothing is masked in."""
    w = mask.to(dtype)
    total = w.sum()
    return w / torch.where(total > 0, total, 1.0)


def _weighted_sum(rows: Tensor, weights: Tensor) -> Tensor:
    """sum_t w_t * rows_t, taking only positions with w_t > 0 (a NaN elsewhere cannot leak in)."""
    return torch.where(weights > 0, rows * weights, 0.0).sum()


def _masked_mean(rows: Tensor, mask: Tensor) -> Tensor:
    return _weighted_sum(rows, _position_weights(mask, rows.dtype))


def _clean(mask: Tensor, **fields: Tensor | None) -> dict[str, Tensor | None]:
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


def _teacher_buckets(topk_logprobs: Tensor, tail_logmass: Tensor, dtype: torch.dtype) -> Tensor:
    """log p on the k+1 buckets: (..., k) and (...) -> (..., k + 1), renormalised to sum to 1.

    Stored F16/BF16 log-probs may miss 1 by up to 3e-2 (SPEC.md); renormalising keeps every divergence a
    divergence between distributions (for F32 caches it changes nothing beyond rounding).
    """
    b = torch.cat([topk_logprobs.to(dtype), tail_logmass.to(dtype)[..., None]], dim=-1)
    return b - torch.logsumexp(b, dim=-1, keepdim=True)


def retemper(topk_logprobs: Tensor, tail_logmass: Tensor, ratio: float) -> tuple[Tensor, Tensor]:
    """Teacher log-probs captured at temperature T_c, moved to temperature T: ratio = T_c / T.

    p_T(i) = p(i)^ratio / Z with Z = sum_K p(j)^ratio + p_tail^ratio (the tail treated as one token).
    On K, renormalised, this is exact: p restricted to K at temperature T is proportional to p^ratio.
    The tail is approximate: the true tempered tail is sum_{j not in K} p(j)^ratio, which is >= p_tail^ratio
    when ratio < 1 (T > T_c, so the tail is underestimated) and <= when ratio > 1. Shapes as given; float32.
    """
    b = _teacher_buckets(topk_logprobs, tail_logmass, torch.promote_types(topk_logprobs.dtype, torch.float32))
    b = b * ratio  # (..., k + 1)
    b = b - torch.logsumexp(b, dim=-1, keepdim=True)  # (..., k + 1)
    return b[..., :-1], b[..., -1]


# ------------------------------------------------------------------------- per-position losses (..., V) -> (...)


def _fkl_ghost_rows(z: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor) -> Tensor:
    t = _teacher_buckets(topk_logprobs, tail_logmass, z.dtype)
    return _kl_terms(t, _student_buckets(z, topk_ids)).sum(-1)


def _fkl_renorm_rows(z: Tensor, topk_ids: Tensor, topk_logprobs: Tensor) -> Tensor:
    t = topk_logprobs.to(z.dtype)
    t = t - torch.logsumexp(t, dim=-1, keepdim=True)  # (..., k)
    s = z.gather(-1, topk_ids)
    s = s - torch.logsumexp(s, dim=-1, keepdim=True)  # (..., k)
    return _kl_terms(t, s).sum(-1)


def _rskd_rows(z: Tensor, sample_ids: Tensor, sample_counts: Tensor) -> Tensor:
    c = sample_counts.to(z.dtype)  # (..., S)
    p_hat = c / c.sum(-1, keepdim=True).clamp_min(1.0)
    log_q = z.gather(-1, sample_ids) - torch.logsumexp(z, dim=-1, keepdim=True)  # (..., S)
    return _kl_terms(p_hat.log(), log_q).sum(-1)


def _rkl_rows(z: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor) -> Tensor:
    t = _teacher_buckets(topk_logprobs, tail_logmass, z.dtype).clamp_min(RKL_LOG_FLOOR)
    return _kl_terms(_student_buckets(z, topk_ids), t).sum(-1)


def _jsd_rows(z: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor, beta: float) -> Tensor:
    if beta == 0.0:
        return _fkl_ghost_rows(z, topk_ids, topk_logprobs, tail_logmass)
    if beta == 1.0:
        return _rkl_rows(z, topk_ids, topk_logprobs, tail_logmass)
    t = _teacher_buckets(topk_logprobs, tail_logmass, z.dtype)
    s = _student_buckets(z, topk_ids)
    log_m = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))  # (..., k + 1)
    return beta * _kl_terms(t, log_m).sum(-1) + (1.0 - beta) * _kl_terms(s, log_m).sum(-1)


def _skew_kl_rows(z: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor, skew: float) -> Tensor:
    if skew == 0.0:
        return _fkl_ghost_rows(z, topk_ids, topk_logprobs, tail_logmass)
    t = _teacher_buckets(topk_logprobs, tail_logmass, z.dtype)
    s = _student_buckets(z, topk_ids)
    log_m = torch.logaddexp(t + math.log(skew), s + math.log1p(-skew))  # (..., k + 1)
    return _kl_terms(t, log_m).sum(-1)


def _tvd_rows(z: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor) -> Tensor:
    t = _teacher_buckets(topk_logprobs, tail_logmass, z.dtype)
    return 0.5 * (t.exp() - _student_buckets(z, topk_ids).exp()).abs().sum(-1)


def _ce_rows(z: Tensor, labels: Tensor) -> Tensor:
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
    f = _clean(mask, topk_ids=topk_ids, topk_logprobs=topk_logprobs, tail_logmass=tail_logmass)
    return _masked_mean(_fkl_ghost_rows(_upcast(logits), **f), mask)


def fkl_renorm(logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Forward KL between p and q both restricted to K and renormalised (DistillKit's default).

        p~_i = p_i / sum_{j in K} p_j,   q~_i = q_i / sum_{j in K} q_j   (i in K)
        loss_t = sum_{i in K} p~_i (log p~_i - log q~_i)

    Tail: ignored on both sides; the student gets no signal about mass outside K (biased, see FACTS.md).
    logits (B, T, V), topk_* (B, T, k), mask (B, T). Returns the mean over masked positions.
    """
    f = _clean(mask, topk_ids=topk_ids, topk_logprobs=topk_logprobs)
    return _masked_mean(_fkl_renorm_rows(_upcast(logits), **f), mask)


def rskd(logits: Tensor, sample_ids: Tensor, sample_counts: Tensor, mask: Tensor) -> Tensor:
    """RS-KD (Anshumann et al., 2025): forward KL against the empirical distribution of N teacher draws.

        p^_i = c_i / N  (N = sum_s c_s, the draws at that position),   log q = log_softmax(logits) over all V
        loss_t = sum_{s: c_s > 0} p^_s (log p^_s - log q_{id_s})

    Unbiased: the gradient w.r.t. the logits is q - p^ and E[p^] = p, so E[grad] = q - p, the gradient of the
    full KL(p || q). The value's expectation is KL(p || q) + H(p) - E[H(p^)]: full forward KL plus a constant
    that does not depend on q. Tail: none needed. Padding slots (id -1, count 0) and positions with no draws
    contribute 0. logits (B, T, V), sample_* (B, T, S), mask (B, T). Returns the mean over masked positions.
    """
    f = _clean(mask, sample_ids=sample_ids, sample_counts=sample_counts)
    return _masked_mean(_rskd_rows(_upcast(logits), **f), mask)


def rkl(logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor, mask: Tensor) -> Tensor:
    """Reverse KL on the (k+1)-bucket coarsening (ghost-bucket tail).

        loss_t = sum_{b in K + tail} q_b (log q_b - max(log p_b, RKL_LOG_FLOOR))

    Tail: one bucket on both sides, so the value is a lower bound of the full KL(q || p): the cache cannot say
    how the teacher's tail mass is spread, and reverse KL is not linear in p, so no unbiased estimate exists.
    A teacher bucket with zero mass is floored at log-prob RKL_LOG_FLOOR (~ -87.3) instead of being infinite.
    Shapes as `fkl_ghost`. Returns the mean over masked positions.
    """
    f = _clean(mask, topk_ids=topk_ids, topk_logprobs=topk_logprobs, tail_logmass=tail_logmass)
    return _masked_mean(_rkl_rows(_upcast(logits), **f), mask)


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
    f = _clean(mask, topk_ids=topk_ids, topk_logprobs=topk_logprobs, tail_logmass=tail_logmass)
    return _masked_mean(_jsd_rows(_upcast(logits), **f, beta=beta), mask)


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
    f = _clean(mask, topk_ids=topk_ids, topk_logprobs=topk_logprobs, tail_logmass=tail_logmass)
    return _masked_mean(_skew_kl_rows(_upcast(logits), **f, skew=skew), mask)


def tvd(logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor, mask: Tensor) -> Tensor:
    """Total variation distance on the (k+1)-bucket coarsening.

        loss_t = 1/2 sum_{b in K + tail} |p_b - q_b|

    Tail: one bucket on both sides; the value is a lower bound of the full TVD (masses of opposite sign inside
    the tail cancel). Shapes as `fkl_ghost`. Returns the mean over masked positions.
    """
    f = _clean(mask, topk_ids=topk_ids, topk_logprobs=topk_logprobs, tail_logmass=tail_logmass)
    return _masked_mean(_tvd_rows(_upcast(logits), **f), mask)


def cross_entropy(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Cross-entropy on the real next token: loss_t = -log q(labels_t), q = softmax(logits) over all V.

    logits (B, T, V), labels (B, T) with -100 ignored, mask (B, T). Returns the mean over positions that are
    masked in and have a label.
    """
    f = _clean(mask, labels=labels)
    return _masked_mean(_ce_rows(_upcast(logits), f["labels"]), f["labels"] != IGNORE_INDEX)


# ------------------------------------------------------------------------------------------- the KD mix

# kind -> per-position loss of student logits z (..., V) and the cleaned teacher fields f; c is the KDConfig.
KD_LOSSES: dict[str, Callable[[Tensor, dict, KDConfig], Tensor]] = {
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
KD_FIELDS = {kind: _GHOST_FIELDS for kind in KD_LOSSES} | {
    "fkl_renorm": ("topk_ids", "topk_logprobs"),
    "rskd": ("sample_ids", "sample_counts"),
}


@dataclass
class KDConfig:
    """How `kd_loss` mixes CE and KD: loss = alpha * CE + (1 - alpha) * temperature^2 * KD."""

    kind: str = "fkl_ghost"  # KD loss, a key of KD_LOSSES
    alpha: float = 0.0  # weight of CE on the real next token, in [0, 1]; KD gets 1 - alpha
    temperature: float = 1.0  # T: KD compares softmax(logits / T) with the teacher re-tempered to T
    capture_temperature: float = 1.0  # T_c the cache was built with (manifest build.temperature)
    beta: float = 0.5  # jsd: mixture weight of the teacher
    skew: float = 0.1  # skew_kl: weight of the teacher in the skewed mixture
    vocab_size: int | None = None  # real vocabulary (manifest tokenizer.vocab_size); logits beyond it are dropped

    def __post_init__(self) -> None:
        if self.kind not in KD_LOSSES:
            raise ValueError(f"KD kind {self.kind!r} is not one of {sorted(KD_LOSSES)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0 or self.capture_temperature <= 0:
            raise ValueError(f"temperatures must be > 0, got {self.temperature} and {self.capture_temperature}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if not 0.0 <= self.skew < 1.0:
            raise ValueError(f"skew must be in [0, 1), got {self.skew}")


def _prepare(mask: Tensor, config: KDConfig, fields: dict[str, Tensor | None], dtype: torch.dtype):
    """Checks, cleans and re-tempers the teacher fields once and returns (loss_sum, f): f the fields flattened
    to (B*T, ...), loss_sum(z, f, sl) the weighted mixed loss summed over rows sl of the flattened batch,
    z (n, V) being those rows' logits. Summed over all rows it is the loss; chunks add up to it."""
    c = config
    use_kd, use_ce = c.alpha < 1.0, c.alpha > 0.0
    needed = (KD_FIELDS[c.kind] if use_kd else ()) + (("labels",) if use_ce else ())
    missing = [name for name in needed if fields.get(name) is None]
    if missing:
        raise ValueError(f"KD kind {c.kind!r} with alpha={c.alpha} needs {', '.join(missing)}")
    f = _clean(mask, **{name: fields[name] for name in needed})

    if use_kd and c.temperature != c.capture_temperature:
        ratio = c.capture_temperature / c.temperature
        if c.kind == "rskd":
            raise ValueError(
                f"rskd: the samples were drawn at capture temperature {c.capture_temperature} and cannot be "
                f"re-tempered to {c.temperature}; use temperature = capture_temperature"
            )
        if c.kind == "fkl_renorm":  # exact: the loss renormalises p^ratio over K itself
            f["topk_logprobs"] = f["topk_logprobs"].to(dtype) * ratio
        else:
            warnings.warn(
                f"re-tempering cached teacher log-probs from T_c={c.capture_temperature} to T={c.temperature} "
                "treats the tail as one token: approximate (see student_trainer.losses.retemper)",
                RetemperWarning,
                stacklevel=3,
            )
            f["topk_logprobs"], f["tail_logmass"] = retemper(f["topk_logprobs"], f["tail_logmass"], ratio)

    f = {name: x.flatten(0, 1) for name, x in f.items()}  # (B*T, ...)
    kd_w = _position_weights(mask, dtype).flatten()  # (B*T,)
    ce_w = _position_weights(f["labels"] != IGNORE_INDEX, dtype) if use_ce else None
    kd_rows, t = KD_LOSSES[c.kind], c.temperature

    def loss_sum(z: Tensor, f: dict[str, Tensor], sl: slice) -> Tensor:
        total = z.new_zeros(())
        if use_ce:  # CE on the real next token at temperature 1 (Hinton)
            total = total + c.alpha * _weighted_sum(_ce_rows(z, f["labels"][sl]), ce_w[sl])
        if use_kd:
            zt = z if t == 1.0 else z / t
            kd = _weighted_sum(kd_rows(zt, {name: x[sl] for name, x in f.items()}, c), kd_w[sl])
            total = total + (1.0 - c.alpha) * t * t * kd
        return total

    return loss_sum, f


def _vocab(config: KDConfig, rows: int) -> int:
    if config.vocab_size is None:
        return rows
    if not 1 <= config.vocab_size <= rows:
        raise ValueError(f"vocab_size {config.vocab_size} does not fit the student's {rows} output rows")
    return config.vocab_size


def kd_loss(
    logits: Tensor,
    mask: Tensor,
    config: KDConfig,
    *,
    labels: Tensor | None = None,
    topk_ids: Tensor | None = None,
    topk_logprobs: Tensor | None = None,
    tail_logmass: Tensor | None = None,
    sample_ids: Tensor | None = None,
    sample_counts: Tensor | None = None,
) -> Tensor:
    """The training loss: alpha * CE + (1 - alpha) * T^2 * KD, each a mean over its positions.

        CE = mean_{t in mask, labels_t != -100} -log softmax(logits_t)[labels_t]          (temperature 1)
        KD = mean_{t in mask} KD_LOSSES[kind](logits_t / T, teacher fields re-tempered from T_c to T)

    T^2 keeps KD gradients on the scale of CE's as T grows (Hinton et al., 2015). Re-tempering (see `retemper`)
    is exact for fkl_renorm and approximate in the tail for the ghost-bucket kinds, which warn
    (RetemperWarning; Python's default filter shows it once per call site) when T != T_c; rskd refuses
    T != T_c. Only the fields the kind needs are required (KD_FIELDS), labels only when alpha > 0.
    logits (B, T, V) any dtype; fields as in the module docstring. Returns a scalar (float32, or float64).
    """
    vocab = _vocab(config, logits.shape[-1])
    z = _upcast(logits[..., :vocab]).flatten(0, 1)  # (B*T, V)
    fields = dict(labels=labels, topk_ids=topk_ids, topk_logprobs=topk_logprobs, tail_logmass=tail_logmass,
                  sample_ids=sample_ids, sample_counts=sample_counts)
    loss_sum, f = _prepare(mask, config, fields, z.dtype)
    return loss_sum(z, f, slice(None))


class _ChunkedHeadLoss(torch.autograd.Function):
    """loss_sum(hidden @ weight[:vocab].T) computed `chunk` rows at a time.

    When gradients are needed, forward also takes each chunk's gradient w.r.t. its logits (autograd on the
    chunk alone) and folds it into grad hidden (N, H) and grad weight (V, H) right away; backward only scales
    them by the incoming gradient. So each chunk's logits are computed once, as in an unchunked loss (three
    matmuls per chunk: logits, grad hidden, grad weight), instead of being recomputed in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, loss_sum, fields, vocab, chunk):
        w = weight[:vocab]  # (V, H)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_h else None  # (N, H)
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None  # (V_full, H)
        for s in range(0, hidden.shape[0], chunk):
            sl = slice(s, s + chunk)
            if not (need_h or need_w):
                total += loss_sum(_upcast(hidden[sl] @ w.T), fields, sl)  # chunk logits (n, V)
                continue
            with torch.enable_grad():
                z = _upcast(hidden[sl] @ w.T).detach().requires_grad_()  # (n, V)
                part = loss_sum(z, fields, sl)
                (grad_z,) = torch.autograd.grad(part, z)
            total += part.detach()
            grad_z = grad_z.to(hidden.dtype)  # (n, V)
            if need_h:
                grad_h[sl] = grad_z @ w
            if need_w:
                grad_w[:vocab].addmm_(grad_z.T.to(acc_dtype), hidden[sl].to(acc_dtype))
            del z, grad_z, part
        # Kept on ctx, not saved for backward: they are our own buffers, which backward scales in place and hands
        # over (a scaled copy would briefly hold a second (V, H) float32 matrix).
        ctx.grads = (grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.grads is None:
            raise RuntimeError("chunked_kd_loss: a second backward through the same loss is not supported")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        if grad_h is not None:
            grad_h.mul_(grad_total.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_total.to(grad_w.dtype)).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


def chunked_kd_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    mask: Tensor,
    config: KDConfig,
    *,
    labels: Tensor | None = None,
    topk_ids: Tensor | None = None,
    topk_logprobs: Tensor | None = None,
    tail_logmass: Tensor | None = None,
    sample_ids: Tensor | None = None,
    sample_counts: Tensor | None = None,
    chunk_tokens: int = 128,
) -> Tensor:
    """`kd_loss(hidden @ lm_head_weight.T, ...)` without ever holding (B, T, V) float32 logits.

    hidden (B, T, H): the student's final hidden states (after its final norm); lm_head_weight (V, H): its output
    embedding (no bias, as in Llama/Qwen). Logits are computed for `chunk_tokens` positions of the flattened
    B*T at a time (the last chunk may be shorter); when gradients are needed, the gradient of the loss w.r.t.
    that chunk's logits is taken with autograd there and then, and folded into grad_hidden and grad_weight, which
    backward only scales (no recompute: the same matmul count as an unchunked loss).
    Peak memory beyond inputs and gradients is a few (chunk_tokens, V) float32 buffers: about
    6 * chunk_tokens * V * 4 bytes (0.45 GB for 128 tokens at V = 152064;
    benchmarks/loss_memory.py measures it). Same value, same gradients as
    `kd_loss` (tested), all-masked batch included. `config.vocab_size` uses only the first rows of the weight;
    the others get a zero gradient.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    vocab = _vocab(config, lm_head_weight.shape[0])
    fields = dict(labels=labels, topk_ids=topk_ids, topk_logprobs=topk_logprobs, tail_logmass=tail_logmass,
                  sample_ids=sample_ids, sample_counts=sample_counts)
    loss_sum, f = _prepare(mask, config, fields, torch.promote_types(hidden.dtype, torch.float32))
    h = hidden.flatten(0, 1)  # (B*T, H)
    return _ChunkedHeadLoss.apply(h, lm_head_weight, loss_sum, f, vocab, chunk_tokens)


# ------------------------------------------------------------------------------------ hidden-state alignment


def parse_layer_map(
    spec: str, student_layers: int, teacher_layers: int, available: Collection[int] | None = None
) -> dict[int, int]:
    """Student layer -> teacher layer, both Hugging Face `hidden_states` indices (0 = embeddings, L = last).

    "2:10,4:20" maps student layer 2 to teacher layer 10 and 4 to 20. "uniform" maps student layers 1..L_s
    evenly onto the teacher's: i -> round(i * L_t / L_s) (half up), so the last maps to the last. `available`
    (the cache's build.hidden_layers), when given, must hold every teacher layer the map uses.
    Raises ValueError naming the offending part.
    """
    text = spec.strip()
    if text == "uniform":
        if student_layers < 1 or teacher_layers < 1:
            raise ValueError(
                f"layer map 'uniform' needs >= 1 layer on each side, got {student_layers} and {teacher_layers}"
            )
        half_up = 2 * student_layers  # round(i * L_t / L_s) in integers, halves rounded up
        mapping = {i: (2 * i * teacher_layers + student_layers) // half_up for i in range(1, student_layers + 1)}
    else:
        mapping = {}
        for piece in text.split(","):
            m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", piece)
            if m is None:
                raise ValueError(
                    f"layer map {spec!r}: {piece!r} is not 'student:teacher'; write e.g. '2:10,4:20' or 'uniform'"
                )
            s, t = int(m[1]), int(m[2])
            if s in mapping:
                raise ValueError(f"layer map {spec!r}: student layer {s} is mapped twice")
            if s > student_layers:
                raise ValueError(f"layer map {spec!r}: student layer {s} is outside 0..{student_layers}")
            if t > teacher_layers:
                raise ValueError(f"layer map {spec!r}: teacher layer {t} is outside 0..{teacher_layers}")
            mapping[s] = t
    if available is not None:
        missing = sorted(set(mapping.values()) - set(available))
        if missing:
            raise ValueError(f"layer map {spec!r} needs teacher layers {missing}; the cache stores {sorted(available)}")
    return mapping


class HiddenProjector(nn.Module):
    """Hidden-state alignment: one learned Linear(H, H_t) per mapped student layer, and its loss.

        loss = mean over (s -> t) in layer_map of  mean_{masked positions} d(W_s h_s + b_s, h_t)
        d = "mse":    mean over H_t of (x - y)^2
        d = "cosine": 1 - x.y / (|x| |y|)

    student_hidden: the student's `hidden_states` (tuple or dict by layer index) of (B, T, H); teacher_hidden:
    dict layer -> (B, T, H_t) as read from the cache (F16/BF16, upcast here); mask (B, T). Returns a scalar;
    0.0 with zero gradient when nothing is masked in.
    """

    def __init__(self, layer_map: Mapping[int, int], student_dim: int, teacher_dim: int, metric: str = "mse"):
        super().__init__()
        if metric not in ("mse", "cosine"):
            raise ValueError(f"hidden alignment metric must be 'mse' or 'cosine', got {metric!r}")
        if not layer_map:
            raise ValueError("HiddenProjector needs at least one mapped layer")
        self.layer_map = dict(layer_map)
        self.metric = metric
        self.proj = nn.ModuleDict({str(s): nn.Linear(student_dim, teacher_dim) for s in self.layer_map})

    def forward(self, student_hidden: Sequence[Tensor] | Mapping[int, Tensor], teacher_hidden: Mapping[int, Tensor],
                mask: Tensor) -> Tensor:
        m = (mask > 0 if mask.is_floating_point() else mask.bool())[..., None]  # (B, T, 1)
        total = None
        for s, t in self.layer_map.items():
            proj = self.proj[str(s)]
            x = _upcast(proj(student_hidden[s].to(proj.weight.dtype)))  # (B, T, H_t)
            y = torch.where(m, _upcast(teacher_hidden[t]), 0.0)  # (B, T, H_t)
            if self.metric == "mse":
                rows = (x - y).pow(2).mean(-1)  # (B, T)
            else:
                rows = 1.0 - F.cosine_similarity(x, y.to(x.dtype), dim=-1, eps=1e-8)  # (B, T)
            loss = _masked_mean(rows, mask)
            total = loss if total is None else total + loss
        return total / len(self.layer_map)
