"""The cross-tokenizer kinds (uld, byte_align) against float64 references written out position by position, through
the same `kd_loss` / `chunked_kd_loss` every kind goes through."""

from __future__ import annotations

import math

import pytest
import torch

from student_trainer.head_loss import chunked_kd_loss
from student_trainer.kd_mix import KDConfig, kd_loss

B, T, V, K, V_TEACHER = 2, 5, 40, 6, 50


def teacher_fields(seed: int, k: int = K, v_teacher: int = V_TEACHER, dtype=torch.float64):
    """A teacher's sorted top-k log-probs and the log of the mass outside them, (B, T, k) and (B, T)."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(B, T, v_teacher, generator=g, dtype=torch.float64) * 2.5, dim=-1)
    top = logp.topk(k, dim=-1).values  # sorted, most probable first
    outside = logp.scatter(-1, logp.topk(k, dim=-1).indices, -math.inf)
    return top.to(dtype), torch.logsumexp(outside, dim=-1).to(dtype)


def student_ids(seed: int, matched: float = 0.5) -> torch.Tensor:
    """(B, T, K) distinct student ids per position, about `matched` of them present (-1: no student token)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    return torch.where(torch.rand(B, T, K, generator=g) < matched, ids, -1)


def logits(seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2.0).to(dtype).requires_grad_()


def reference_uld(z: torch.Tensor, top: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """One position: teacher ranks 1..k and its tail against the student's sorted probabilities."""
    p = torch.cat([top.exp(), tail.exp()[None]])
    p = p / p.sum()
    q = torch.softmax(z, dim=-1).sort(descending=True).values
    q_top = torch.cat([q, q.new_zeros(max(0, len(top) - len(q)))])[: len(top)]
    return (p[:-1].sort(descending=True).values - q_top).abs().sum() + (p[-1] - q[len(top):].sum()).abs()


def reference_byte_align(z: torch.Tensor, ids: torch.Tensor, top: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    p = torch.cat([top.exp(), tail.exp()[None]])
    p = p / p.sum()
    q = torch.softmax(z, dim=-1)
    matched = [r for r in range(len(top)) if ids[r] >= 0]
    zero = z.new_zeros(())
    kl = sum((p[r] * (p[r].log() - q[ids[r]].log()) for r in matched), zero)
    p_rest = 1 - sum((p[r] for r in matched), zero)
    q_rest = 1 - sum((q[ids[r]] for r in matched), zero)
    kl = kl + p_rest * (p_rest.log() - q_rest.log())
    a = torch.stack([p[r] * 0 if r in matched else p[r] for r in range(len(top))]).sort(descending=True).values
    keep = [i for i in range(len(q)) if i not in {int(ids[r]) for r in matched}]
    b = q[keep].sort(descending=True).values
    uld = (a - b[: len(top)]).abs().sum() + (p[-1] - b[len(top):].sum()).abs()
    return kl + uld


def reference_mean(rows, mask: torch.Tensor) -> torch.Tensor:
    picked = [rows(b, t) for b in range(B) for t in range(T) if mask[b, t]]
    return torch.stack(picked).mean()


def mask_of(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, T, generator=g) < 0.7
    m[0, 0] = True
    return m


def test_uld_equals_the_float64_reference_in_value_and_gradient():
    top, tail = teacher_fields(0)
    z, mask = logits(1), mask_of(2)
    got = kd_loss(z, mask, KDConfig(kind="uld"), topk_ids=torch.full((B, T, K), -1), topk_logprobs=top,
                  tail_logmass=tail)
    (g_got,) = torch.autograd.grad(got, z)
    want = reference_mean(lambda b, t: reference_uld(z[b, t], top[b, t], tail[b, t]), mask)
    (g_want,) = torch.autograd.grad(want, z)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


def test_uld_is_the_exact_sorted_l1_when_the_teacher_has_no_tail():
    # k = the teacher's whole vocabulary: every rank is known, the student's extra ranks are compared with zeros.
    top, tail = teacher_fields(3, k=8, v_teacher=8)
    tail = torch.full_like(tail, -math.inf)
    z, mask = logits(4), torch.ones(B, T, dtype=torch.bool)
    got = kd_loss(z, mask, KDConfig(kind="uld"), topk_ids=torch.full((B, T, 8), -1), topk_logprobs=top,
                  tail_logmass=tail)
    p = torch.cat([top.exp(), torch.zeros(B, T, V - 8, dtype=torch.float64)], dim=-1)
    q = torch.softmax(z, dim=-1).sort(dim=-1, descending=True).values
    torch.testing.assert_close(got, (p - q).abs().sum(-1).mean(), rtol=1e-12, atol=1e-12)


def test_uld_pads_a_student_vocabulary_smaller_than_k_with_zeros():
    top, tail = teacher_fields(5, k=12)
    z = torch.randn(B, T, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(B, T, dtype=torch.bool)
    got = kd_loss(z, mask, KDConfig(kind="uld"), topk_ids=torch.full((B, T, 12), -1), topk_logprobs=top,
                  tail_logmass=tail)
    want = reference_mean(lambda b, t: reference_uld(z[b, t], top[b, t], tail[b, t]), mask)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("matched", [0.0, 0.5, 1.0])
def test_byte_align_equals_the_float64_reference_in_value_and_gradient(matched):
    top, tail = teacher_fields(6)
    ids, z, mask = student_ids(7, matched), logits(8), mask_of(9)
    got = kd_loss(z, mask, KDConfig(kind="byte_align"), topk_ids=ids, topk_logprobs=top, tail_logmass=tail)
    (g_got,) = torch.autograd.grad(got, z)
    want = reference_mean(lambda b, t: reference_byte_align(z[b, t], ids[b, t], top[b, t], tail[b, t]), mask)
    (g_want,) = torch.autograd.grad(want, z)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-12)


def test_byte_align_with_nothing_matched_is_uld():
    top, tail = teacher_fields(10)
    z, mask = logits(11), mask_of(12)
    none = torch.full((B, T, K), -1)
    fields = dict(topk_ids=none, topk_logprobs=top, tail_logmass=tail)
    torch.testing.assert_close(kd_loss(z, mask, KDConfig(kind="byte_align"), **fields),
                               kd_loss(z, mask, KDConfig(kind="uld"), **fields), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["uld", "byte_align"])
def test_an_all_masked_batch_gives_zero_with_zero_gradient_even_over_nan_fields(kind):
    top, tail = teacher_fields(13, dtype=torch.float32)
    top[:, 1:] = math.nan  # masked-out positions may hold anything
    z = logits(14, torch.float32)
    for mask in (torch.zeros(B, T, dtype=torch.bool), torch.zeros(B, T, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True)):
        loss = kd_loss(z, mask, KDConfig(kind=kind), topk_ids=student_ids(15), topk_logprobs=top, tail_logmass=tail)
        (grad,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        if not mask.any():
            assert loss.item() == 0.0 and not grad.any()


@pytest.mark.parametrize("kind", ["uld", "byte_align"])
def test_chunked_loss_equals_the_plain_one_for_cross_tokenizer_kinds(kind):
    top, tail = teacher_fields(16, dtype=torch.float32)
    g = torch.Generator().manual_seed(17)
    hidden = torch.randn(B, T, 16, generator=g, requires_grad=True)
    weight = torch.randn(V + 3, 16, generator=g, requires_grad=True)  # 3 padded rows past the vocabulary
    labels = torch.randint(0, V, (B, T), generator=g)
    mask, ids = mask_of(18), student_ids(19)
    config = KDConfig(kind=kind, alpha=0.3, temperature=2.0, capture_temperature=2.0, vocab_size=V)
    fields = dict(labels=labels, topk_ids=ids, topk_logprobs=top, tail_logmass=tail)
    plain = kd_loss(hidden @ weight.T, mask, config, **fields)
    grads_plain = torch.autograd.grad(plain, (hidden, weight))
    chunked = chunked_kd_loss(hidden, weight, mask, config, chunk_tokens=3, **fields)
    grads_chunked = torch.autograd.grad(chunked, (hidden, weight))
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_chunked, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not grads_chunked[1][V:].any()  # rows past the vocabulary get nothing
