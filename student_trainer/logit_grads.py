"""Losses whose gradient w.r.t. the logits is written in place, for the chunked output-head loss (head_loss.py).

Autograd through one chunk's loss keeps several (n, V) float32 tensors alive at once (the log-softmax, the logits
outside the top k, their softmax, the gradient); `loss_and_grad_` takes the one (n, V) buffer that holds the chunk's
logits and overwrites it with d loss / d logits from the closed forms below: one exp pass, no other (n, V) tensor.
Covered: CE, fkl_ghost and rskd, each alone or mixed with CE at temperature 1 (the default recipe). Other kinds, and
a mix at another temperature (two softmaxes), return None: the caller takes autograd, as before.

Per position, with q = softmax(z / T) and the tail as one bucket (notation as in losses.py), the gradient w.r.t.
z / T is
    CE (T = 1):   q - onehot(label)
    fkl_ghost:    q_i - p_i for i in K;   q_j - p_tail q_j / q_tail = q_j (1 - p_tail / q_tail) for j outside K
    rskd:         q - p^   (p^ = counts / N on the drawn ids)
and the loss weights them by alpha * (CE weight) and (1 - alpha) * T^2 * (KD weight) / T (the chain rule's 1 / T).
The sums off K are taken relative to the largest logit off K, so a student whose tail underflows float32 still
gets the exact q_j / q_tail.
"""

from __future__ import annotations

import torch
from torch import Tensor

from student_trainer.buckets import kl_terms, teacher_buckets
from student_trainer.kd_mix import Mix
from student_trainer.losses import weighted_sum

FUSED_KINDS = ("fkl_ghost", "rskd")


def loss_and_grad_(mix: Mix, z: Tensor, sl: slice) -> Tensor | None:
    """The mixed loss of rows sl of the batch, z (n, V) float32 (or float64) being their logits, which this overwrites
    with the loss's gradient w.r.t. them. None, with z untouched, where no closed form applies (see the module)."""
    c = mix.config
    use_kd, use_ce = c.alpha < 1.0, mix.ce_w is not None
    t = c.temperature if use_kd else 1.0
    if (use_kd and c.kind not in FUSED_KINDS) or (use_kd and use_ce and t != 1.0):
        return None
    f = {name: x[sl] for name, x in mix.fields.items()}
    zero = z.new_zeros(z.shape[0], 1)
    w_kd = (1.0 - c.alpha) * t * t * mix.kd_w[sl, None] if use_kd else zero  # (n, 1) weight of the KD value
    g_kd = w_kd / t  # (n, 1) of its gradient w.r.t. z
    g_ce = c.alpha * mix.ce_w[sl, None] if use_ce else zero  # (n, 1)
    if t != 1.0:
        z.div_(t)
    if use_ce:
        labels = f["labels"].clamp_min(0)[:, None]  # (n, 1); -100 rows have weight 0
        z_label = z.gather(1, labels)[:, 0]
    if not use_kd:
        lse = _softmax_(z, g_ce)
        total = z.new_zeros(())
    elif c.kind == "fkl_ghost":
        tb = teacher_buckets(f["topk_logprobs"], f["tail_logmass"], z.dtype)  # (n, k + 1) log p
        kd, lse = _fkl_ghost_(z, f["topk_ids"], tb, g_kd, g_ce)
        total = weighted_sum(kd, w_kd[:, 0])
    else:
        kd, lse = _rskd_(z, f["sample_ids"], f["sample_counts"], g_kd, g_ce)
        total = weighted_sum(kd, w_kd[:, 0])
    if use_ce:
        total = total + weighted_sum(lse[:, 0] - z_label, g_ce[:, 0])
        z.scatter_add_(1, labels, -g_ce)
    return total


def _softmax_(z: Tensor, g: Tensor) -> Tensor:
    """z (n, V) -> g * softmax(z) in place; returns logsumexp(z) (n, 1)."""
    m = z.amax(dim=1, keepdim=True)
    z.sub_(m).exp_()
    s = z.sum(dim=1, keepdim=True)
    z.mul_(g / s)
    return m + s.log()


def _fkl_ghost_(z: Tensor, ids: Tensor, tb: Tensor, g_kd: Tensor, g_ce: Tensor) -> tuple[Tensor, Tensor]:
    """fkl_ghost rows (n,) and logsumexp(z) (n, 1); z (n, V) becomes (g_kd + g_ce) q - g_kd P, P the ghost target
    (p on K, p_tail q / q_tail off K). ids (n, k), tb (n, k + 1) the teacher's log buckets."""
    zk = z.gather(1, ids)  # (n, k)
    z.scatter_(1, ids, float("-inf"))
    m_out = z.amax(dim=1, keepdim=True)  # (n, 1) the largest logit off K
    m_out = torch.where(torch.isfinite(m_out), m_out, 0.0)  # nothing off K (k = V): every e below is 0
    z.sub_(m_out).exp_()  # e_j = exp(z_j - m_out) off K, 0 on K
    s_out = z.sum(dim=1, keepdim=True)  # (n, 1), >= 1 when anything is off K
    m = torch.maximum(m_out, zk.amax(dim=1, keepdim=True))
    lse = m + (s_out * (m_out - m).exp() + (zk - m).exp().sum(dim=1, keepdim=True)).log()  # (n, 1)
    log_qk = zk - lse  # (n, k)
    log_qtail = m_out + s_out.log() - lse  # (n, 1), -inf when nothing is off K
    kd = kl_terms(tb, torch.cat([log_qk, log_qtail], dim=1)).sum(dim=1)
    p = tb.exp()
    g = g_kd + g_ce
    p_tail_per_e = torch.where(s_out > 0, p[:, -1:] / s_out, 0.0)  # p_tail q_j / q_tail = e_j p_tail / s_out
    z.mul_(g * (m_out - lse).exp() - g_kd * p_tail_per_e)
    z.scatter_(1, ids, g * log_qk.exp() - g_kd * p[:, :-1])
    return kd, lse


def _rskd_(z: Tensor, ids: Tensor, counts: Tensor, g_kd: Tensor, g_ce: Tensor) -> tuple[Tensor, Tensor]:
    """rskd rows (n,) and logsumexp(z) (n, 1); z (n, V) becomes (g_kd + g_ce) q - g_kd p^. ids, counts (n, S)."""
    z_ids = z.gather(1, ids)  # (n, S)
    lse = _softmax_(z, g_kd + g_ce)
    c = counts.to(z.dtype)
    p_hat = c / c.sum(dim=1, keepdim=True).clamp_min(1.0)  # (n, S); padding slots hold 0
    kd = kl_terms(p_hat.log(), z_ids - lse).sum(dim=1)
    z.scatter_add_(1, ids, -g_kd * p_hat)
    return kd, lse
