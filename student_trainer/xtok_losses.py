"""Cross-tokenizer distillation losses: a student with its own vocabulary against the cached teacher top-k.

A cross-tokenizer batch (student_trainer/xtok_align.py) holds, at each student position whose token ends at the
same byte as a teacher token, that teacher position's top-k log-probs and tail; its `topk_ids` are not the
teacher's ids but the *student* ids whose byte strings equal the teacher entries' (-1: the student has no such
token). Both losses are per-position rows for `losses.KD_LOSSES`, so `kd_loss` (kd_mix.py) and `chunked_kd_loss`
(head_loss.py) mix them with CE, re-temper, mask and chunk them like every other kind. The teacher's buckets and
the KL term are buckets.py's, as for the same-tokenizer kinds.

Notation as in losses.py, plus
    V  student vocabulary            k  teacher top-k entries          sid  their student ids (..., k), -1 none
    p  teacher distribution: the top-k (sorted, most probable first) and one tail bucket, renormalised to 1
    q  student distribution, softmax over the student's V

Tail: as for the ghost-bucket kinds, the teacher's tail is one bucket, and so is the student's mass beyond the
ranks (or ids) compared. Each loss is therefore a lower bound of the same loss on full distributions (|sum a -
sum b| <= sum |a - b|, and the data-processing inequality for the KL part).
"""

from __future__ import annotations

import torch
from torch import Tensor

from student_trainer.buckets import kl_terms, teacher_buckets


def _sorted_l1(p_top: Tensor, p_rest: Tensor, z: Tensor, lse: Tensor) -> Tensor:
    """sum_r |p_(r) - q_(r)| over r <= k, plus |p_rest - q_rest|: ULD on k ranks and a rest bucket.

    p_top (..., k) teacher probabilities (any order, sorted here, most probable first), p_rest (...) the teacher
    mass not in p_top; z (..., V) student logits where entries to leave out are the dtype's minimum; lse (..., 1)
    logsumexp of the full logits. q_(r) is the student's r-th largest probability among the entries left in
    (zeros past V), q_rest its mass beyond those k ranks.
    """
    k = p_top.shape[-1]
    p_sorted = p_top.sort(dim=-1, descending=True).values  # (..., k)
    top = z.topk(min(k, z.shape[-1]), dim=-1)  # values, indices (..., min(k, V))
    q_top = (top.values - lse).exp()
    if q_top.shape[-1] < k:  # a vocabulary smaller than k: the student's missing ranks are zeros
        q_top = torch.cat([q_top, q_top.new_zeros(*q_top.shape[:-1], k - q_top.shape[-1])], dim=-1)
    beyond = z.scatter(-1, top.indices, torch.finfo(z.dtype).min)  # (..., V)
    q_rest = (torch.logsumexp(beyond, dim=-1) - lse[..., 0]).exp()  # (...,): no 1 - sum, so no cancellation
    return (p_sorted - q_top).abs().sum(-1) + (p_rest - q_rest).abs()


def uld_rows(z: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor) -> Tensor:
    """Universal Logit Distillation (Boizard et al., 2024): the Wasserstein-1 distance between the sorted
    probability vectors of teacher and student, which needs no correspondence between the vocabularies.

        loss_t = sum_{r=1..k} |p_(r) - q_(r)|  +  |p_tail - sum_{r>k} q_(r)|

    p_(r) is the teacher's r-th largest probability (its sorted top-k), q_(r) the student's (top-k of softmax(z));
    a student vocabulary smaller than k is padded with zero probabilities. Tail: the paper compares every rank;
    the cache knows only the teacher's top k, so the ranks beyond k are compared as one bucket each side (the
    teacher's tail mass against the student's mass beyond its top k). That is a lower bound of the full ULD,
    and equal to it when the teacher's tail is empty (tail_logmass = -inf).
    z (..., V) student logits; topk_logprobs (..., k); tail_logmass (...). Returns (...).
    """
    t = teacher_buckets(topk_logprobs, tail_logmass, z.dtype).exp()  # (..., k + 1)
    return _sorted_l1(t[..., :-1], t[..., -1], z, torch.logsumexp(z, dim=-1, keepdim=True))


def byte_align_rows(z: Tensor, student_ids: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor) -> Tensor:
    """GOLD-style hybrid (TRL's GOLD trainer, `uld_use_hybrid_loss`): forward KL where the vocabularies share
    the token, ULD on the rest.

    M = the teacher's top-k entries whose byte string is also one student token (sid >= 0), R = everything else.

        KL part:  sum_{i in M} p_i (log p_i - log q_sid(i))  +  p_R (log p_R - log q_R)
                  p_R = 1 - sum_M p_i (the unmatched top-k entries and the tail), q_R = 1 - sum_M q_sid(i)
        ULD part: sum_{r=1..k} |a_(r) - b_(r)|  +  |p_tail - b_rest|
                  a = p on the unmatched top-k entries (matched ones count 0), sorted; b_(r) = the student's r-th
                  largest probability among its ids not in sid(M); b_rest = its mass beyond those k ranks
        loss_t = KL part + ULD part

    The KL part is forward KL on the (|M|+1)-bucket coarsening (matched ids, one rest bucket): it teaches which
    shared tokens come next and how much mass the rest gets; the ULD part shapes the rest without ids. Weights
    are 1 and 1. Tail: the teacher's tail joins R in the KL part and is one bucket in the ULD part (as `uld_rows`),
    so both parts are lower bounds of the same losses on full distributions. With no entry matched the KL part
    compares one bucket holding all mass on each side (0) and the loss is `uld_rows`.
    z (..., V); student_ids (..., k) int, -1 where the entry has no student token; topk_logprobs (..., k);
    tail_logmass (...). Returns (...).
    """
    vocab = z.shape[-1]
    t = teacher_buckets(topk_logprobs, tail_logmass, z.dtype)  # (..., k + 1) log p
    matched = student_ids >= 0  # (..., k)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (..., 1)
    # Unmatched entries point at an extra column that already holds the minimum, so one scatter serves all rows.
    floor = torch.finfo(z.dtype).min
    z_ext = torch.cat([z, z.new_full((*z.shape[:-1], 1), floor)], dim=-1)  # (..., V + 1)
    slot = torch.where(matched, student_ids, vocab).long()  # (..., k)
    z_rest = z_ext.scatter(-1, slot, floor)  # (..., V + 1): matched student ids left out

    log_q_m = z_ext.gather(-1, slot) - lse  # (..., k); unmatched entries unused
    log_p_m = torch.where(matched, t[..., :-1], -torch.inf)
    log_p_rest = torch.logsumexp(torch.cat([torch.where(matched, -torch.inf, t[..., :-1]), t[..., -1:]], -1), -1)
    log_q_rest = torch.logsumexp(z_rest, dim=-1) - lse[..., 0]  # (...)
    kl = kl_terms(log_p_m, log_q_m).sum(-1) + kl_terms(log_p_rest, log_q_rest)

    p_unmatched = torch.where(matched, 0.0, t[..., :-1].exp())  # (..., k)
    uld = _sorted_l1(p_unmatched, t[..., -1].exp(), z_rest[..., :vocab], lse)
    return kl + uld


# kind -> per-position loss of student logits z (..., V) and the cleaned fields f (losses.KD_LOSSES's signature).
XTOK_LOSSES = {
    "uld": lambda z, f, c: uld_rows(z, f["topk_logprobs"], f["tail_logmass"]),
    "byte_align": lambda z, f, c: byte_align_rows(z, f["topk_ids"], f["topk_logprobs"], f["tail_logmass"]),
}
