"""student_trainer.losses against dense float64 references built from a full teacher distribution p.

Every test draws teacher logits, takes p = softmax over the whole vocabulary, and builds the cached fields from
p exactly as the cache builder would (top-k, tail mass, RS-KD samples). The references compute each loss from
the dense p and q by its formula, by a different code path than losses.py (probabilities, sums over masks).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from student_trainer import losses as L

B, T, V, K = 3, 5, 100, 8
DT = torch.float64


# --------------------------------------------------------------------------------------------- fixtures


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(g: torch.Generator, *shape: int, scale: float = 2.5) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=g, dtype=DT)


def cached_topk(log_p: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """topk_ids, topk_logprobs, tail_logmass from the full log p (..., V): the fields the cache stores."""
    top_lp, top_ids = torch.topk(log_p, k, dim=-1)
    tail = torch.logsumexp(log_p.scatter(-1, top_ids, -math.inf), dim=-1)  # -inf when k = V
    return dict(topk_ids=top_ids.int(), topk_logprobs=top_lp, tail_logmass=tail)


def draw_samples(p: torch.Tensor, draws: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """sample_ids / sample_counts (..., S = draws) as SPEC.md orders them: count descending, then id ascending."""
    flat = p.reshape(-1, p.shape[-1])
    n_vocab = flat.shape[-1]
    picked = torch.multinomial(flat, draws, replacement=True, generator=g)  # (R, N)
    counts = torch.zeros_like(flat, dtype=torch.long).scatter_add_(1, picked, torch.ones_like(picked))  # (R, V)
    key = counts * n_vocab + (n_vocab - 1 - torch.arange(n_vocab))
    order = key.argsort(dim=1, descending=True)[:, :draws]  # (R, S)
    c = counts.gather(1, order)
    ids = torch.where(c > 0, order, -1)
    shape = (*p.shape[:-1], draws)
    return dict(sample_ids=ids.int().reshape(shape), sample_counts=c.to(torch.uint8).reshape(shape))


def some_mask(g: torch.Generator, *shape: int) -> torch.Tensor:
    m = torch.rand(*shape, generator=g) < 0.7
    m.view(-1)[0] = True
    return m


def buckets(probs: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Dense (k+1)-bucket coarsening of probabilities (..., V): the top-k entries, then the sum of the rest."""
    in_k = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, topk_ids.long(), True)
    return torch.cat([probs.gather(-1, topk_ids.long()), (probs * ~in_k).sum(-1, keepdim=True)], dim=-1)


def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(a > 0, a * (a.log() - b.log()), 0.0).sum(-1)


def masked_mean(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return rows[mask].mean()


DENSE = {  # the formula of each divergence on probability vectors P (teacher), Q (student)
    "fkl_ghost": lambda P, Q: kl(P, Q),
    "rkl": lambda P, Q: kl(Q, P),
    "jsd": lambda P, Q: 0.3 * kl(P, 0.3 * P + 0.7 * Q) + 0.7 * kl(Q, 0.3 * P + 0.7 * Q),
    "skew_kl": lambda P, Q: kl(P, 0.1 * P + 0.9 * Q),
    "tvd": lambda P, Q: 0.5 * (P - Q).abs().sum(-1),
}
CALL = {  # the same losses through the public functions
    "fkl_ghost": lambda z, f, m: L.fkl_ghost(z, f["topk_ids"], f["topk_logprobs"], f["tail_logmass"], m),
    "rkl": lambda z, f, m: L.rkl(z, f["topk_ids"], f["topk_logprobs"], f["tail_logmass"], m),
    "jsd": lambda z, f, m: L.jsd(z, f["topk_ids"], f["topk_logprobs"], f["tail_logmass"], m, beta=0.3),
    "skew_kl": lambda z, f, m: L.skew_kl(z, f["topk_ids"], f["topk_logprobs"], f["tail_logmass"], m, skew=0.1),
    "tvd": lambda z, f, m: L.tvd(z, f["topk_ids"], f["topk_logprobs"], f["tail_logmass"], m),
}


def value_and_grad(fn, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().requires_grad_()
    loss = fn(z)
    (g,) = torch.autograd.grad(loss, z)
    return loss.detach(), g


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """max |actual - expected| <= rel * max |expected| (relative to the tensor's scale, not per element)."""
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual - expected).abs().max()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} * {scale:.3g}"


def setup_batch(seed: int, k: int = K):
    g = gen(seed)
    log_p = torch.log_softmax(random_logits(g, B, T, V), -1)
    z = random_logits(g, B, T, V, scale=1.5)
    return log_p, z, cached_topk(log_p, k), some_mask(g, B, T)


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
    labels[0, 1] = L.IGNORE_INDEX
    mask = some_mask(g, B, T)
    counted = mask & (labels != L.IGNORE_INDEX)

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


def all_fields(seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    g = gen(seed)
    log_p, z, f, mask = setup_batch(seed)
    f |= draw_samples(log_p.exp(), 20, g)
    f["labels"] = torch.randint(0, V, (B, T), generator=g)
    return z, f, mask


@pytest.mark.parametrize("kind", sorted(L.KD_LOSSES))
def test_masked_out_positions_reach_neither_the_value_nor_the_gradient(kind):
    z, f, mask = all_fields(10)
    cfg = L.KDConfig(kind=kind, alpha=0.25)
    garbage = dict(f)
    off = ~mask
    garbage["topk_logprobs"] = f["topk_logprobs"].masked_fill(off[..., None], math.nan)
    garbage["tail_logmass"] = f["tail_logmass"].masked_fill(off, math.nan)
    garbage["topk_ids"] = f["topk_ids"].masked_fill(off[..., None], -1)
    garbage["sample_ids"] = f["sample_ids"].masked_fill(off[..., None], 10**6)
    garbage["labels"] = f["labels"].masked_fill(off, 10**6)

    value, grad = value_and_grad(lambda z: L.kd_loss(z, mask, cfg, **garbage), z)
    assert torch.isfinite(value) and (grad[off] == 0).all()
    # Equal to the loss over the masked-in positions alone, as a (1, n) batch.
    sub = {name: x[mask][None] for name, x in f.items()}
    only = L.kd_loss(z[mask][None], torch.ones(1, int(mask.sum()), dtype=torch.bool), cfg, **sub)
    torch.testing.assert_close(value, only, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(L.KD_LOSSES))
def test_an_all_masked_batch_gives_exactly_zero_and_a_zero_gradient(kind):
    z, f, _ = all_fields(11)
    mask = torch.zeros(B, T, dtype=torch.bool)
    value, grad = value_and_grad(lambda z: L.kd_loss(z, mask, L.KDConfig(kind=kind, alpha=0.5), **f), z)
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
    out = L.kd_loss(half, mask, L.KDConfig(kind="fkl_ghost"), **f16)
    assert out.dtype == torch.float32
    ref = L.kd_loss(half.float(), mask, L.KDConfig(kind="fkl_ghost"), **f16)
    assert out.item() == ref.item()


# ------------------------------------------------------------------------------------ mixing and temperature


def test_alpha_mixes_cross_entropy_and_kd_linearly():
    z, f, mask = all_fields(14)
    ce = L.cross_entropy(z, f["labels"], mask)
    kd = CALL["fkl_ghost"](z, f, mask)
    mixed = L.kd_loss(z, mask, L.KDConfig(kind="fkl_ghost", alpha=0.3), **f)
    torch.testing.assert_close(mixed, 0.3 * ce + 0.7 * kd, rtol=1e-12, atol=1e-12)
    only_ce = L.kd_loss(z, mask, L.KDConfig(alpha=1.0), labels=f["labels"])  # no teacher fields needed
    torch.testing.assert_close(only_ce, ce, rtol=1e-12, atol=1e-12)


def test_temperature_divides_student_logits_and_multiplies_kd_by_its_square():
    z, f, mask = all_fields(15)
    cfg = L.KDConfig(kind="fkl_ghost", alpha=0.2, temperature=2.0, capture_temperature=2.0)
    expected = 0.2 * L.cross_entropy(z, f["labels"], mask) + 0.8 * 4.0 * CALL["fkl_ghost"](z / 2.0, f, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # T == T_c: no re-tempering, no warning
        torch.testing.assert_close(L.kd_loss(z, mask, cfg, **f), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("capture", "train"), [(1.0, 2.0), (2.0, 1.0)])
def test_retempered_renormalised_top_k_kd_equals_the_dense_kl_at_the_training_temperature(capture, train):
    g = gen(16)
    teacher, z = random_logits(g, B, T, V), random_logits(g, B, T, V)
    mask = some_mask(g, B, T)
    f = cached_topk(torch.log_softmax(teacher / capture, -1), K)
    ids = f["topk_ids"].long()
    p_k = torch.softmax(teacher / train, -1).gather(-1, ids)
    q_k = torch.softmax(z / train, -1).gather(-1, ids)
    expected = train**2 * masked_mean(kl(p_k / p_k.sum(-1, keepdim=True), q_k / q_k.sum(-1, keepdim=True)), mask)
    cfg = L.KDConfig(kind="fkl_renorm", temperature=train, capture_temperature=capture)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact: no warning
        torch.testing.assert_close(L.kd_loss(z, mask, cfg, **f), expected, rtol=1e-10, atol=1e-12)


def test_retempering_with_a_tail_bucket_warns_and_keeps_a_normalised_distribution():
    z, f, mask = all_fields(17)
    cfg = L.KDConfig(kind="fkl_ghost", temperature=2.0, capture_temperature=1.0)
    with pytest.warns(L.RetemperWarning, match="approximate"):
        L.kd_loss(z, mask, cfg, **f)
    lp, tail = L.retemper(f["topk_logprobs"], f["tail_logmass"], 0.5)
    total = torch.logsumexp(torch.cat([lp, tail[..., None]], -1), -1)
    torch.testing.assert_close(total, torch.zeros_like(total), rtol=0, atol=1e-12)
    same_lp, same_tail = L.retemper(f["topk_logprobs"], f["tail_logmass"], 1.0)
    torch.testing.assert_close(same_lp, f["topk_logprobs"], rtol=0, atol=1e-12)
    torch.testing.assert_close(same_tail, f["tail_logmass"], rtol=0, atol=1e-12)


def test_rskd_refuses_a_temperature_other_than_the_capture_temperature():
    z, f, mask = all_fields(18)
    with pytest.raises(ValueError, match="capture temperature"):
        L.kd_loss(z, mask, L.KDConfig(kind="rskd", temperature=2.0), **f)


def test_kd_loss_names_the_teacher_fields_a_kind_is_missing():
    z, f, mask = all_fields(19)
    with pytest.raises(ValueError, match="sample_ids, sample_counts"):
        L.kd_loss(z, mask, L.KDConfig(kind="rskd"), topk_ids=f["topk_ids"])
    with pytest.raises(ValueError, match="labels"):
        L.kd_loss(z, mask, L.KDConfig(alpha=0.5), **{k: v for k, v in f.items() if k != "labels"})
    with pytest.raises(ValueError, match="not one of"):
        L.KDConfig(kind="kl")


# --------------------------------------------------------------------------------------- chunked = unchunked

H = 16


def head_batch(seed: int, dtype: torch.dtype):
    z, f, mask = all_fields(seed)
    g = gen(seed + 1000)
    f["labels"][0, 2] = L.IGNORE_INDEX
    hidden = torch.randn(B, T, H, generator=g, dtype=DT).to(dtype)
    weight = (0.3 * torch.randn(V, H, generator=g, dtype=DT)).to(dtype)
    return hidden, weight, f, mask


def grads(fn, hidden, weight):
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = fn(hidden, weight)
    return (loss.detach(), *torch.autograd.grad(2.5 * loss, (hidden, weight)))  # 2.5: the upstream gradient counts


@pytest.mark.parametrize("kind", sorted(L.KD_LOSSES))
@pytest.mark.parametrize("chunk", [1, 4, 6, 64])  # B*T = 15: 4 and 6 leave a short last chunk
def test_chunked_loss_equals_the_unchunked_loss_in_value_and_gradients(kind, chunk):
    hidden, weight, f, mask = head_batch(20, DT)
    cfg = L.KDConfig(kind=kind, alpha=0.3, temperature=2.0, capture_temperature=2.0)
    plain = grads(lambda h, w: L.kd_loss(h @ w.T, mask, cfg, **f), hidden, weight)
    chunked = grads(lambda h, w: L.chunked_kd_loss(h, w, mask, cfg, chunk_tokens=chunk, **f), hidden, weight)
    for a, b in zip(chunked, plain):
        assert_rel_close(a, b, 1e-10)


@pytest.mark.parametrize("kind", ["fkl_ghost", "rskd", "jsd"])
def test_chunked_loss_equals_the_unchunked_loss_in_float32(kind):
    hidden, weight, f, mask = head_batch(21, torch.float32)
    f = {name: x.float() if x.is_floating_point() else x for name, x in f.items()}
    cfg = L.KDConfig(kind=kind, alpha=0.3)
    plain = grads(lambda h, w: L.kd_loss(h @ w.T, mask, cfg, **f), hidden, weight)
    chunked = grads(lambda h, w: L.chunked_kd_loss(h, w, mask, cfg, chunk_tokens=4, **f), hidden, weight)
    for a, b in zip(chunked, plain):
        assert_rel_close(a, b, 1e-5)


def test_chunked_loss_of_an_all_masked_batch_is_zero_with_zero_gradients():
    hidden, weight, f, _ = head_batch(22, DT)
    mask = torch.zeros(B, T, dtype=torch.bool)
    value, g_h, g_w = grads(lambda h, w: L.chunked_kd_loss(h, w, mask, L.KDConfig(alpha=0.5), chunk_tokens=4, **f),
                            hidden, weight)
    assert value.item() == 0.0 and (g_h == 0).all() and (g_w == 0).all()


def test_chunked_loss_ignores_padded_vocabulary_rows_beyond_vocab_size():
    hidden, weight, f, mask = head_batch(23, DT)
    padded = torch.cat([weight, torch.randn(7, H, dtype=DT)])  # embedding rows beyond the real vocabulary
    cfg = L.KDConfig(alpha=0.3, vocab_size=V)
    value, g_h, g_w = grads(lambda h, w: L.chunked_kd_loss(h, w, mask, cfg, chunk_tokens=4, **f), hidden, padded)
    plain = grads(lambda h, w: L.kd_loss(h @ w.T, mask, cfg, **f), hidden, padded)
    assert (g_w[V:] == 0).all()
    for a, b in zip((value, g_h, g_w), plain):
        assert_rel_close(a, b, 1e-10)


def test_chunked_loss_takes_bfloat16_weights_and_returns_bfloat16_gradients():
    hidden, weight, f, mask = head_batch(24, torch.bfloat16)
    cfg = L.KDConfig(alpha=0.3)
    value, g_h, g_w = grads(lambda h, w: L.chunked_kd_loss(h, w, mask, cfg, chunk_tokens=4, **f), hidden, weight)
    plain = grads(lambda h, w: L.kd_loss(h @ w.T, mask, cfg, **f), hidden, weight)
    assert value.dtype == torch.float32 and g_h.dtype == g_w.dtype == torch.bfloat16
    for a, b in zip((value, g_h, g_w), plain):
        assert_rel_close(a.float(), b.float(), 2e-2)


def test_a_vocab_size_larger_than_the_student_output_is_refused():
    hidden, weight, f, mask = head_batch(25, DT)
    with pytest.raises(ValueError, match="vocab_size 101 does not fit the student's 100 output rows"):
        L.chunked_kd_loss(hidden, weight, mask, L.KDConfig(vocab_size=V + 1), **f)


# ------------------------------------------------------------------------------------ hidden-state alignment


def projector_batch(metric: str):
    g = gen(30)
    proj = L.HiddenProjector({1: 2, 3: 6}, student_dim=8, teacher_dim=12, metric=metric).double()
    student = tuple(torch.randn(B, T, 8, generator=g, dtype=DT) for _ in range(4))  # hidden_states 0..3
    teacher = {2: torch.randn(B, T, 12, generator=g).half(), 6: torch.randn(B, T, 12, generator=g).half()}
    return proj, student, teacher, some_mask(g, B, T)


def test_hidden_projector_has_one_linear_per_mapped_layer_from_student_to_teacher_width():
    proj, student, teacher, mask = projector_batch("mse")
    assert sorted(proj.proj) == ["1", "3"]
    assert all(lin.weight.shape == (12, 8) and lin.bias.shape == (12,) for lin in proj.proj.values())
    assert proj(student, teacher, mask).shape == ()


@pytest.mark.parametrize("metric", ["mse", "cosine"])
def test_hidden_projector_loss_is_the_mean_over_layers_of_the_masked_distance(metric):
    proj, student, teacher, mask = projector_batch(metric)
    per_layer = []
    for s, t in [(1, 2), (3, 6)]:
        lin = proj.proj[str(s)]
        x, y = student[s] @ lin.weight.T + lin.bias, teacher[t].double()
        if metric == "mse":
            d = ((x - y) ** 2).mean(-1)
        else:
            d = 1 - (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
        per_layer.append(d[mask].mean())
    torch.testing.assert_close(proj(student, teacher, mask), sum(per_layer) / 2, rtol=1e-12, atol=1e-12)
    nothing = proj(student, teacher, torch.zeros(B, T, dtype=torch.bool))
    nothing.backward()
    assert nothing.item() == 0.0 and all((p.grad == 0).all() for p in proj.parameters())


def test_hidden_projector_rejects_an_unknown_metric():
    with pytest.raises(ValueError, match="'mse' or 'cosine'"):
        L.HiddenProjector({1: 2}, 8, 12, metric="l1")


def test_layer_map_parses_student_teacher_pairs():
    assert L.parse_layer_map("2:10,4:20", 4, 24) == {2: 10, 4: 20}
    assert L.parse_layer_map(" 2 : 10 , 4:20 ", 4, 24, available=[10, 20, 24]) == {2: 10, 4: 20}


def test_uniform_layer_map_spreads_student_layers_evenly_and_ends_on_the_last_teacher_layer():
    assert L.parse_layer_map("uniform", 4, 12) == {1: 3, 2: 6, 3: 9, 4: 12}
    assert L.parse_layer_map("uniform", 3, 8) == {1: 3, 2: 5, 3: 8}
    m = L.parse_layer_map("uniform", 24, 36)
    assert list(m) == list(range(1, 25)) and m[24] == 36
    assert all(b > a for a, b in zip(list(m.values()), list(m.values())[1:]))


@pytest.mark.parametrize(("spec", "message"), [
    ("", "is not 'student:teacher'"),
    ("2-10", "'2-10' is not 'student:teacher'"),
    ("a:b", "'a:b' is not 'student:teacher'"),
    ("2:10,", "'' is not 'student:teacher'"),
    ("2:10,2:12", "student layer 2 is mapped twice"),
    ("5:10", r"student layer 5 is outside 0\.\.4"),
    ("2:30", r"teacher layer 30 is outside 0\.\.24"),
    ("-1:3", "is not 'student:teacher'"),
])
def test_bad_layer_maps_raise_a_value_error_that_names_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        L.parse_layer_map(spec, 4, 24)


def test_layer_map_refuses_teacher_layers_the_cache_does_not_store():
    with pytest.raises(ValueError, match=r"needs teacher layers \[6, 18\]; the cache stores \[12, 24\]"):
        L.parse_layer_map("uniform", 4, 24, available=[12, 24])
