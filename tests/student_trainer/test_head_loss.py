"""student_trainer.head_loss: the chunked output-head loss equals kd_loss on the full logits, in value and
gradients, in float64, float32 and bfloat16, all-masked and with padded vocabulary rows."""

from __future__ import annotations

import pytest
import torch

from student_trainer import losses as L
from student_trainer.batch import IGNORE_INDEX
from student_trainer.head_loss import auto_chunk_tokens, chunked_kd_loss
from student_trainer.kd_mix import KDConfig, kd_loss, prepare_mix
from student_trainer.logit_grads import loss_and_grad_
from tests.student_trainer.teacher_fields import B, DT, T, V, all_fields, assert_rel_close, gen


# --------------------------------------------------------------------------------------- chunked = unchunked

H = 16


def head_batch(seed: int, dtype: torch.dtype):
    z, f, mask = all_fields(seed)
    g = gen(seed + 1000)
    f["labels"][0, 2] = IGNORE_INDEX
    hidden = torch.randn(B, T, H, generator=g, dtype=DT).to(dtype)
    weight = (0.3 * torch.randn(V, H, generator=g, dtype=DT)).to(dtype)
    return hidden, weight, f, mask


def grads(fn, hidden, weight):
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = fn(hidden, weight)
    return (loss.detach(), *torch.autograd.grad(2.5 * loss, (hidden, weight)))  # 2.5: the upstream gradient counts


def assert_chunked_equals_plain(hidden, weight, f, mask, cfg, tol, chunk: int | None = 4):
    """Value, grad hidden and grad weight of chunked_kd_loss equal kd_loss's on the full logits."""
    plain = grads(lambda h, w: kd_loss(h @ w.T, mask, cfg, **f), hidden, weight)
    chunked = grads(lambda h, w: chunked_kd_loss(h, w, mask, cfg, chunk_tokens=chunk, **f), hidden, weight)
    for a, b in zip(chunked, plain):
        assert_rel_close(a.float() if tol > 1e-6 else a, b.float() if tol > 1e-6 else b, tol)
    return chunked


@pytest.mark.parametrize("kind", sorted(L.KD_LOSSES))
@pytest.mark.parametrize("chunk", [1, 4, 6, 64])  # B*T = 15: 4 and 6 leave a short last chunk
def test_chunked_loss_equals_the_unchunked_loss_in_value_and_gradients(kind, chunk):
    hidden, weight, f, mask = head_batch(20, DT)
    cfg = KDConfig(kind=kind, alpha=0.3, temperature=2.0, capture_temperature=2.0)
    assert_chunked_equals_plain(hidden, weight, f, mask, cfg, 1e-10, chunk=chunk)


@pytest.mark.parametrize("kind", ["fkl_ghost", "rskd"])
@pytest.mark.parametrize("alpha, temperature", [(0.0, 1.0), (0.3, 1.0), (1.0, 1.0), (0.0, 2.0), (1.0, 2.0)])
def test_the_in_place_gradients_equal_autograd_on_the_unchunked_loss(kind, alpha, temperature):
    hidden, weight, f, mask = head_batch(26, DT)
    cfg = KDConfig(kind=kind, alpha=alpha, temperature=temperature, capture_temperature=temperature)
    h, w = hidden.flatten(0, 1), weight
    mix = prepare_mix(mask, cfg, f, DT)
    assert loss_and_grad_(mix, (h[:4] @ w.T).clone(), slice(0, 4)) is not None  # the closed form, not autograd
    assert_chunked_equals_plain(hidden, weight, f, mask, cfg, 1e-10, chunk=4)


def test_the_in_place_ghost_gradient_stays_exact_when_the_students_tail_underflows():
    hidden, weight, f, mask = head_batch(27, DT)
    weight = weight.clone()
    # The student puts ~all its mass on the teacher's top k: exp of the other logits, relative to the largest,
    # is below float64's range. Autograd on float64 is the reference; the closed form must not lose q_j / q_tail.
    hidden = hidden.abs()
    weight[:, :] = -1.0
    weight[f["topk_ids"][0, 0].long()] = 80.0
    cfg = KDConfig(kind="fkl_ghost", alpha=0.0)
    chunked = assert_chunked_equals_plain(hidden, weight, f, mask, cfg, 1e-10, chunk=4)
    assert all(torch.isfinite(x).all() for x in chunked)


def test_the_default_chunk_holds_no_more_float32_logits_than_the_hidden_states():
    assert auto_chunk_tokens(1024, 896, 4, 152064) == 6  # 6 x 152064 x 4 bytes <= 1024 x 896 x 4
    assert auto_chunk_tokens(8192, 4096, 2, 128256) == 130
    assert auto_chunk_tokens(4, 16, 4, 1_000_000) == 1
    hidden, weight, f, mask = head_batch(28, DT)
    cfg = KDConfig(alpha=0.3)
    assert_chunked_equals_plain(hidden, weight, f, mask, cfg, 1e-10, chunk=None)


@pytest.mark.parametrize("kind", ["fkl_ghost", "rskd", "jsd"])
def test_chunked_loss_equals_the_unchunked_loss_in_float32(kind):
    hidden, weight, f, mask = head_batch(21, torch.float32)
    f = {name: x.float() if x.is_floating_point() else x for name, x in f.items()}
    cfg = KDConfig(kind=kind, alpha=0.3)
    assert_chunked_equals_plain(hidden, weight, f, mask, cfg, 1e-5, chunk=4)


def test_chunked_loss_of_an_all_masked_batch_is_zero_with_zero_gradients():
    hidden, weight, f, _ = head_batch(22, DT)
    mask = torch.zeros(B, T, dtype=torch.bool)
    value, g_h, g_w = grads(lambda h, w: chunked_kd_loss(h, w, mask, KDConfig(alpha=0.5), chunk_tokens=4, **f),
                            hidden, weight)
    assert value.item() == 0.0 and (g_h == 0).all() and (g_w == 0).all()


def test_chunked_loss_ignores_padded_vocabulary_rows_beyond_vocab_size():
    hidden, weight, f, mask = head_batch(23, DT)
    padded = torch.cat([weight, torch.randn(7, H, dtype=DT)])  # embedding rows beyond the real vocabulary
    cfg = KDConfig(alpha=0.3, vocab_size=V)
    value, g_h, g_w = grads(lambda h, w: chunked_kd_loss(h, w, mask, cfg, chunk_tokens=4, **f), hidden, padded)
    plain = grads(lambda h, w: kd_loss(h @ w.T, mask, cfg, **f), hidden, padded)
    assert (g_w[V:] == 0).all()
    for a, b in zip((value, g_h, g_w), plain):
        assert_rel_close(a, b, 1e-10)


def test_chunked_loss_takes_bfloat16_weights_and_returns_bfloat16_gradients():
    hidden, weight, f, mask = head_batch(24, torch.bfloat16)
    cfg = KDConfig(alpha=0.3)
    value, g_h, g_w = grads(lambda h, w: chunked_kd_loss(h, w, mask, cfg, chunk_tokens=4, **f), hidden, weight)
    plain = grads(lambda h, w: kd_loss(h @ w.T, mask, cfg, **f), hidden, weight)
    assert value.dtype == torch.float32 and g_h.dtype == g_w.dtype == torch.bfloat16
    for a, b in zip((value, g_h, g_w), plain):
        assert_rel_close(a.float(), b.float(), 2e-2)


def test_a_vocab_size_larger_than_the_student_output_is_refused():
    hidden, weight, f, mask = head_batch(25, DT)
    with pytest.raises(ValueError, match="vocab_size 101 does not fit the student's 100 output rows"):
        chunked_kd_loss(hidden, weight, mask, KDConfig(vocab_size=V + 1), **f)




def test_under_bf16_autocast_the_chunked_loss_matches_the_unchunked_one_with_float32_gradients():
    hidden, weight, f, mask = head_batch(29, torch.float32)
    f = {name: x.float() if x.is_floating_point() else x for name, x in f.items()}
    cfg = KDConfig(alpha=0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = grads(lambda h, w: kd_loss(h @ w.T, mask, cfg, **f), hidden, weight)
        chunked = grads(lambda h, w: chunked_kd_loss(h, w, mask, cfg, chunk_tokens=4, **f), hidden, weight)
    assert chunked[1].dtype == chunked[2].dtype == torch.float32
    for a, b in zip(chunked, plain):
        assert_rel_close(a.float(), b.float(), 2e-2)
