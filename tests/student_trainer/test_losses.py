"""student_trainer.losses against dense float64 references built from a full teacher distribution p (see
teacher_fields.py), and the conventions every loss shares: masked-out positions, all-masked batches, float masks,
half-precision logits."""

from __future__ import annotations

import math

import pytest
import torch

from student_trainer import losses as L
from student_trainer.batch import IGNORE_INDEX
from student_trainer.kd_mix import KDConfig, kd_loss
from student_trainer.settings import KD_KINDS
from tests.student_trainer.teacher_fields import (
    B,
    CALL,
    DENSE,
    DT,
    K,
    T,
    V,
    all_fields,
    buckets,
    cached_topk,
    draw_samples,
    gen,
    kl,
    masked_mean,
    random_logits,
    setup_batch,
    some_mask,
    value_and_grad,
)


def test_the_kd_losses_by_name_are_the_kinds_a_run_can_choose():
    assert tuple(L.KD_LOSSES) == KD_KINDS
    assert tuple(L.KD_FIELDS) == KD_KINDS


# ------------------------------------------------------------------------------- each loss vs float64 reference


@pytest.mark.parametrize("kind", sorted(DENSE))
def test_each_ghost_bucket_loss_equals_its_dense_formula_on_the_coarsened_distributions(kind):
    log_p, z, f, mask = setup_batch(1)
    P = buckets(log_p.exp(), f["topk_ids"])

    def reference(z):
        return masked_mean(DENSE[kind](P, buckets(torch.softmax(z, -1), f["topk_ids"])), mask)

    value, grad = value_and_grad(lambda z: CALL[kind](z, f, mask), z)
    ref_value, ref_grad = value_and_grad(reference, z)
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(DENSE))
def test_each_ghost_bucket_loss_is_a_lower_bound_of_the_full_divergence(kind):
    log_p, z, f, mask = setup_batch(2)
    full = DENSE[kind](log_p.exp(), torch.softmax(z, -1))  # (B, T) over all V
    for t in zip(*torch.nonzero(mask, as_tuple=True)):
        one = torch.zeros_like(mask)
        one[t] = True
        assert CALL[kind](z, f, one) <= full[t] + 1e-12


def test_jsd_endpoints_follow_trl_and_zero_skew_is_forward_kl():
    _, z, f, mask = setup_batch(31)
    args = (z, f["topk_ids"], f["topk_logprobs"], f["tail_logmass"], mask)
    assert L.jsd(*args, beta=0.0) == L.fkl_ghost(*args)
    assert L.jsd(*args, beta=1.0) == L.rkl(*args)
    assert L.skew_kl(*args, skew=0.0) == L.fkl_ghost(*args)


def test_teacher_buckets_that_miss_one_by_rounding_are_renormalised():
    log_p, z, f, mask = setup_batch(32)
    rounded = dict(f, topk_logprobs=f["topk_logprobs"].to(torch.bfloat16).to(DT))  # bf16 rounding of the top k
    P = buckets(log_p.exp(), f["topk_ids"])
    P = torch.cat([rounded["topk_logprobs"].exp(), P[..., -1:]], -1)
    reference = masked_mean(kl(P / P.sum(-1, keepdim=True), buckets(torch.softmax(z, -1), f["topk_ids"])), mask)
    torch.testing.assert_close(CALL["fkl_ghost"](z, rounded, mask), reference, rtol=1e-10, atol=1e-12)


def test_ghost_forward_kl_gradient_on_the_top_k_is_the_full_kl_gradient():
    log_p, z, f, mask = setup_batch(33)
    _, grad = value_and_grad(lambda z: CALL["fkl_ghost"](z, f, mask), z)
    full = (torch.softmax(z, -1) - log_p.exp()) / mask.sum()  # d mean KL(p || q) / dz at masked positions
    ids = f["topk_ids"].long()
    torch.testing.assert_close(grad.gather(-1, ids)[mask], full.gather(-1, ids)[mask], rtol=1e-9, atol=1e-14)


def test_ghost_forward_kl_with_k_equal_to_the_vocabulary_is_the_full_kl():
    log_p, z, f, mask = setup_batch(3, k=V)
    assert torch.isneginf(f["tail_logmass"]).all()

    def reference(z):
        return masked_mean(kl(log_p.exp(), torch.softmax(z, -1)), mask)

    value, grad = value_and_grad(lambda z: CALL["fkl_ghost"](z, f, mask), z)
    ref_value, ref_grad = value_and_grad(reference, z)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-12)


def test_renormalised_forward_kl_equals_the_kl_of_p_and_q_restricted_to_the_top_k():
    log_p, z, f, mask = setup_batch(4)
    ids = f["topk_ids"].long()

    def reference(z):
        p_k = log_p.exp().gather(-1, ids)
        q_k = torch.softmax(z, -1).gather(-1, ids)
        return masked_mean(kl(p_k / p_k.sum(-1, keepdim=True), q_k / q_k.sum(-1, keepdim=True)), mask)

    value, grad = value_and_grad(lambda z: L.fkl_renorm(z, f["topk_ids"], f["topk_logprobs"], mask), z)
    ref_value, ref_grad = value_and_grad(reference, z)
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-12)


def test_rskd_equals_the_kl_from_the_sample_frequencies_to_the_full_student_distribution():
    g = gen(5)
    log_p, z, _, mask = setup_batch(5)
    s = draw_samples(log_p.exp(), 50, g)

    def reference(z):
        p_hat = torch.zeros_like(z).scatter_add(-1, s["sample_ids"].long().clamp_min(0), s["sample_counts"].to(DT)) / 50
        return masked_mean(kl(p_hat, torch.softmax(z, -1)), mask)

    value, grad = value_and_grad(lambda z: L.rskd(z, s["sample_ids"], s["sample_counts"], mask), z)
    ref_value, ref_grad = value_and_grad(reference, z)
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-12)


def test_rskd_gradient_averaged_over_many_draws_is_the_full_forward_kl_gradient():
    draws, reps = 50, 2000
    g = gen(6)
    p = torch.softmax(random_logits(g, V, scale=1.5), -1)  # (V,)
    z = random_logits(g, V, scale=1.0)
    s = draw_samples(p.expand(reps, 1, V), draws, g)  # (R, 1, S): one position, 2000 independent caches
    ones = torch.ones(reps, 1, dtype=torch.bool)

    _, mean_grad = value_and_grad(lambda z: L.rskd(z.expand(reps, 1, V), s["sample_ids"], s["sample_counts"], ones), z)
    full_grad = torch.softmax(z, -1) - p  # d KL(p || softmax(z)) / dz
    std_err = (p * (1 - p) / (draws * reps)).sqrt()  # of the mean of c_i / N over the draws
    assert ((mean_grad - full_grad).abs() <= 5 * std_err + 1e-12).all()

    # The test has power: top-k KD (biased) misses by many standard errors.
    f = cached_topk(p.log().expand(1, 1, V), K)
    _, topk_grad = value_and_grad(
        lambda z: L.fkl_renorm(z.expand(1, 1, V), f["topk_ids"], f["topk_logprobs"], ones[:1]), z
    )
    assert ((topk_grad - full_grad).abs() / std_err).max() > 20


def test_rskd_value_averaged_over_draws_is_the_full_forward_kl_up_to_a_student_independent_constant():
    draws, reps = 50, 2000
    g = gen(7)
    p = torch.softmax(random_logits(g, V, scale=1.5), -1)
    z1, z2 = random_logits(g, V, scale=1.0), random_logits(g, V, scale=1.0)
    s = draw_samples(p.expand(reps, 1, V), draws, g)
    ones = torch.ones(reps, 1, dtype=torch.bool)

    def mean_rskd(z):
        return L.rskd(z.expand(reps, 1, V), s["sample_ids"], s["sample_counts"], ones)

    a = torch.log_softmax(z2, -1) - torch.log_softmax(z1, -1)  # rskd(z1) - rskd(z2) = sum_i p^_i a_i
    expected = (p * a).sum()  # = KL(p || q1) - KL(p || q2)
    std_err = (((p * a * a).sum() - expected**2) / (draws * reps)).sqrt()
    assert (mean_rskd(z1) - mean_rskd(z2) - expected).abs() <= 5 * std_err


def test_cross_entropy_is_the_negative_log_probability_of_the_label_and_skips_minus_100():
    g = gen(8)
    z = random_logits(g, B, T, V)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 1] = IGNORE_INDEX
    mask = some_mask(g, B, T)
    counted = mask & (labels != IGNORE_INDEX)

    def reference(z):
        return -torch.log_softmax(z, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0][counted].mean()

    value, grad = value_and_grad(lambda z: L.cross_entropy(z, labels, mask), z)
    ref_value, ref_grad = value_and_grad(reference, z)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)


def test_ghost_tail_of_a_confident_float32_student_stays_accurate_and_its_gradient_finite():
    log_p, _, f, mask = setup_batch(9)
    z = torch.zeros(B, T, V, dtype=DT).scatter(-1, f["topk_ids"].long(), 25.0)  # q_tail ~ V * e^-25 ~ 1e-9
    ref = CALL["fkl_ghost"](z, f, mask)
    f32 = {name: x.float() if x.is_floating_point() else x for name, x in f.items()}
    value, grad = value_and_grad(lambda z: CALL["fkl_ghost"](z, f32, mask), z.float())
    assert torch.isfinite(grad).all()
    assert abs(value.item() - ref.item()) <= 1e-5 * ref.item()


# --------------------------------------------------------------------------------------- masks and reduction


@pytest.mark.parametrize("kind", sorted(L.KD_LOSSES))
def test_masked_out_positions_reach_neither_the_value_nor_the_gradient(kind):
    z, f, mask = all_fields(10)
    cfg = KDConfig(kind=kind, alpha=0.25)
    garbage = dict(f)
    off = ~mask
    garbage["topk_logprobs"] = f["topk_logprobs"].masked_fill(off[..., None], math.nan)
    garbage["tail_logmass"] = f["tail_logmass"].masked_fill(off, math.nan)
    garbage["topk_ids"] = f["topk_ids"].masked_fill(off[..., None], -1)
    garbage["sample_ids"] = f["sample_ids"].masked_fill(off[..., None], 10**6)
    garbage["labels"] = f["labels"].masked_fill(off, 10**6)

    value, grad = value_and_grad(lambda z: kd_loss(z, mask, cfg, **garbage), z)
    assert torch.isfinite(value) and (grad[off] == 0).all()
    # Equal to the loss over the masked-in positions alone, as a (1, n) batch.
    sub = {name: x[mask][None] for name, x in f.items()}
    only = kd_loss(z[mask][None], torch.ones(1, int(mask.sum()), dtype=torch.bool), cfg, **sub)
    torch.testing.assert_close(value, only, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(L.KD_LOSSES))
def test_an_all_masked_batch_gives_exactly_zero_and_a_zero_gradient(kind):
    z, f, _ = all_fields(11)
    mask = torch.zeros(B, T, dtype=torch.bool)
    value, grad = value_and_grad(lambda z: kd_loss(z, mask, KDConfig(kind=kind, alpha=0.5), **f), z)
    assert value.item() == 0.0 and not value.isnan()
    assert (grad == 0).all()
    value, grad = value_and_grad(lambda z: L.cross_entropy(z, f["labels"], mask.float()), z)
    assert value.item() == 0.0 and (grad == 0).all()


def test_a_float_mask_weights_positions():
    z, f, _ = all_fields(12)
    w = torch.rand(B, T, generator=gen(12), dtype=DT)
    w[0, 0] = 0.0
    per_position = torch.stack([
        L.fkl_ghost(z[b, t][None, None], f["topk_ids"][b, t][None, None], f["topk_logprobs"][b, t][None, None],
                    f["tail_logmass"][b, t][None, None], torch.ones(1, 1, dtype=torch.bool))
        for b in range(B) for t in range(T)
    ]).reshape(B, T)
    expected = (w * per_position).sum() / w.sum()
    torch.testing.assert_close(CALL["fkl_ghost"](z, f, w), expected, rtol=1e-12, atol=1e-12)


def test_half_precision_logits_are_upcast_to_float32():
    z, f, mask = all_fields(13)
    half = z.to(torch.bfloat16)
    f16 = {name: x.to(torch.float16) if x.is_floating_point() else x for name, x in f.items()}
    out = kd_loss(half, mask, KDConfig(kind="fkl_ghost"), **f16)
    assert out.dtype == torch.float32
    ref = kd_loss(half.float(), mask, KDConfig(kind="fkl_ghost"), **f16)
    assert out.item() == ref.item()


