"""student_trainer.head_loss: the chunked output-head loss equals kd_loss on the full logits, in value and
gradients, in float64, float32 and bfloat16, all-masked and with padded vocabulary rows."""

from __future__ import annotations

import pytest
import torch

from student_trainer import losses as L
from student_trainer.batch import IGNORE_INDEX
from student_trainer.head_loss import chunked_kd_loss
from student_trainer.kd_mix import KDConfig, kd_loss
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


@pytest.mark.parametrize("kind", sorted(L.KD_LOSSES))
@pytest.mark.parametrize("chunk", [1, 4, 6, 64])  # B*T = 15: 4 and 6 leave a short last chunk
def test_chunked_loss_equals_the_unchunked_loss_in_value_and_gradients(kind, chunk):
    hidden, weight, f, mask = head_batch(20, DT)
    cfg = KDConfig(kind=kind, alpha=0.3, temperature=2.0, capture_temperature=2.0)
    plain = grads(lambda h, w: kd_loss(h @ w.T, mask, cfg, **f), hidden, weight)
    chunked = grads(lambda h, w: chunked_kd_loss(h, w, mask, cfg, chunk_tokens=chunk, **f), hidden, weight)
    for a, b in zip(chunked, plain):
        assert_rel_close(a, b, 1e-10)


@pytest.mark.parametrize("kind", ["fkl_ghost", "rskd", "jsd"])
def test_chunked_loss_equals_the_unchunked_loss_in_float32(kind):
    hidden, weight, f, mask = head_batch(21, torch.float32)
    f = {name: x.float() if x.is_floating_point() else x for name, x in f.items()}
    cfg = KDConfig(kind=kind, alpha=0.3)
    plain = grads(lambda h, w: kd_loss(h @ w.T, mask, cfg, **f), hidden, weight)
    chunked = grads(lambda h, w: chunked_kd_loss(h, w, mask, cfg, chunk_tokens=4, **f), hidden, weight)
    for a, b in zip(chunked, plain):
        assert_rel_close(a, b, 1e-5)


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


