"""benchmarks/online_kd.py: the full-logit KD reference agrees with the cached-KD losses where they must."""

from __future__ import annotations

import pytest
import torch

from benchmarks.online_kd import full_kd_loss, online_step, teacher_logits
from student_trainer.batch import Batch
from student_trainer.kd_mix import KDConfig, kd_loss
from student_trainer.losses import fkl_ghost

B, T, V = 2, 5, 40


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V + 3, generator=g, dtype=torch.float64) * 2  # 3 padded student rows
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 2] = -100
    return s, t, mask, labels


def _full_topk(t: torch.Tensor, temperature: float = 1.0):
    """The whole teacher distribution as a 'top-k' with k = V and an empty tail."""
    logp = torch.log_softmax(t / temperature, -1)
    vals, ids = logp.sort(-1, descending=True)
    return ids, vals, torch.full(t.shape[:-1], -torch.inf, dtype=t.dtype)


def test_full_kd_equals_fkl_ghost_with_k_equal_to_vocab_and_no_tail():
    s, t, mask, _ = _inputs()
    ids, vals, tail = _full_topk(t)
    expected = fkl_ghost(s[..., :V], ids, vals, tail, mask)
    got = full_kd_loss(s, t, mask)
    assert torch.allclose(got.double(), expected, atol=1e-5)


def test_full_kd_mix_equals_kd_loss_with_temperature_and_ce():
    s, t, mask, labels = _inputs(1)
    for temperature, alpha in [(1.0, 0.3), (2.0, 0.5)]:
        # fkl_renorm over K = every id is the full KL, and its re-tempering to T is exact.
        ids, vals, _ = _full_topk(t)
        config = KDConfig(kind="fkl_renorm", alpha=alpha, temperature=temperature, vocab_size=V)
        expected = kd_loss(s, mask, config, labels=labels, topk_ids=ids, topk_logprobs=vals)
        got = full_kd_loss(s, t, mask, temperature=temperature, alpha=alpha, labels=labels)
        assert torch.allclose(got.double(), expected, atol=1e-5), (temperature, alpha)


def test_full_kd_gradient_matches_fkl_ghost():
    s, t, mask, _ = _inputs(2)
    ids, vals, tail = _full_topk(t)
    a = s[..., :V].float().clone().requires_grad_()
    b = s.float().clone().requires_grad_()
    fkl_ghost(a, ids, vals.float(), tail.float(), mask).backward()
    full_kd_loss(b, t.float(), mask).backward()
    assert torch.allclose(b.grad[..., :V], a.grad, atol=1e-6)
    assert torch.all(b.grad[..., V:] == 0)  # padded rows get nothing


def test_all_masked_batch_gives_zero_loss_and_zero_gradient():
    s, t, _, labels = _inputs(3)
    s = s.float().requires_grad_()
    loss = full_kd_loss(s, t.float(), torch.zeros(B, T, dtype=torch.bool), alpha=0.5, labels=labels)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(s.grad == 0)


def test_alpha_without_labels_is_an_error():
    s, t, mask, _ = _inputs()
    with pytest.raises(ValueError, match="labels"):
        full_kd_loss(s, t, mask, alpha=0.5)


def _tiny_llama(seed: int, vocab: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def test_online_steps_move_the_student_towards_the_teacher():
    teacher, student = _tiny_llama(0).eval().requires_grad_(False), _tiny_llama(1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 60, (2, 12), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    batch = Batch(input_ids=ids, position_ids=torch.arange(12).expand(2, 12), labels=labels, kd_mask=labels != -100,
                  topk_ids=torch.zeros(2, 12, 1, dtype=torch.long), topk_logprobs=torch.zeros(2, 12, 1),
                  tail_logmass=torch.zeros(2, 12), target_logprob=torch.zeros(2, 12), num_tokens=24)
    t = teacher_logits(teacher, batch, vocab_size=60)
    assert t.shape == (2, 12, 60) and t.dtype == torch.float32 and not t.is_inference()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    losses = [online_step(student, teacher, batch, optimizer, vocab_size=60)["loss"] for _ in range(10)]
    assert losses[-1] < losses[0] * 0.8
