"""cache_builder.capture: the fused reduction against a float64 reference, its top-k by levels, the tiny-tail
fallback, and RS-KD draws that neither depend on the row chunks nor lose improbable ids."""

from __future__ import annotations

import pytest
import torch

from cache_builder import capture
from cache_builder.capture import CaptureSettings, capture_rows, draw_samples, reduction_rows, top_k


def logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def reference(x: torch.Tensor, cs: CaptureSettings, next_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The record computed the slow way, in float64: log_softmax, top-k, logsumexp outside it, gather."""
    logp = torch.log_softmax(x[:, : cs.vocab_size].double() / cs.temperature, dim=-1)
    top, ids = logp.topk(cs.top_k, dim=-1)
    tail = torch.logsumexp(logp.scatter(1, ids, float("-inf")), dim=-1)
    target = logp.gather(1, next_ids.clamp(min=0)[:, None])[:, 0]
    return {"topk_ids": ids, "topk_logprobs": top, "tail_logmass": tail,
            "target_logprob": torch.where(next_ids >= 0, target, torch.nan)}


@pytest.mark.parametrize("vocab, model_rows", [(49152, 49152), (5003, 5067), (300, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_capture_is_within_float32_rounding_of_a_float64_computation(vocab, model_rows, dtype, temperature):
    x = logits(40, model_rows).to(dtype)
    next_ids = torch.randint(0, vocab, (40,), generator=torch.Generator().manual_seed(1))
    next_ids[-1] = -1
    cs = CaptureSettings(top_k=16, vocab_size=vocab, temperature=temperature)
    got = capture_rows(x, next_ids, cs)
    want = reference(x.float(), cs, next_ids)
    assert got["topk_ids"].dtype == torch.int32 and (got["topk_ids"] < vocab).all()
    # bf16 logits tie often: the ids may come in another order among equal log-probs, never with other values.
    chosen = torch.log_softmax(x[:, :vocab].double() / temperature, dim=-1).gather(1, got["topk_ids"].long())
    torch.testing.assert_close(chosen, want["topk_logprobs"], rtol=0, atol=2e-6)
    torch.testing.assert_close(got["topk_logprobs"].double(), want["topk_logprobs"], rtol=0, atol=2e-6)
    torch.testing.assert_close(got["tail_logmass"].double(), want["tail_logmass"], rtol=0, atol=2e-6)
    torch.testing.assert_close(got["target_logprob"].double(), want["target_logprob"], rtol=0, atol=2e-6,
                               equal_nan=True)
    if dtype == torch.float32:
        assert torch.equal(got["topk_ids"].long(), want["topk_ids"])


@pytest.mark.parametrize("vocab, k", [(49152, 64), (49152 + 37, 64), (10000, 1), (2000, 5)])
def test_top_k_by_levels_finds_what_torch_topk_finds(vocab, k):
    x = logits(30, vocab, seed=vocab)
    x[3, 100:] = float("-inf")  # fewer finite entries than blocks
    x[4, ::7] = 9.0  # many equal maxima
    x[5, -5:] = 50.0  # the largest entries past the last whole block
    values, ids = top_k(x, k)
    want, _ = x.topk(k, dim=1)
    assert torch.equal(values, want)
    assert torch.equal(x.gather(1, ids), values) and (ids < vocab).all()
    assert all(len(set(row.tolist())) == k for row in ids)


def test_a_tail_below_float32_range_is_summed_with_its_own_maximum():
    x = logits(6, 5000, scale=1.0)
    x[:, 7] += 150.0  # every other entry is below e^-87 relative to the top one: exp underflows in float32
    x[:3, 8] += 149.5
    cs = CaptureSettings(top_k=2, vocab_size=5000)
    got = capture_rows(x, torch.zeros(6, dtype=torch.long), cs)
    want = reference(x, cs, torch.zeros(6, dtype=torch.long))
    assert torch.isfinite(got["tail_logmass"]).all() and (got["tail_logmass"] < -100).all()
    torch.testing.assert_close(got["tail_logmass"].double(), want["tail_logmass"], rtol=0, atol=1e-4)


def test_a_top_k_holding_every_id_leaves_a_tail_of_minus_infinity():
    x = logits(5, 50)
    got = capture_rows(x, torch.zeros(5, dtype=torch.long), CaptureSettings(top_k=50, vocab_size=50))
    assert torch.isneginf(got["tail_logmass"]).all()


def test_draws_and_records_do_not_depend_on_the_row_chunks(monkeypatch):
    x = logits(300, 3000)
    next_ids = torch.arange(300) % 3000
    cs = CaptureSettings(top_k=4, vocab_size=3000, sample_draws=30)
    monkeypatch.setattr(capture, "CPU_CHUNK_BYTES", 70 * 4 * 3000 // torch.get_num_threads())  # chunks of ~70 rows
    assert reduction_rows(x.device, 3000, cs.row_chunk) < 100  # several chunks, not aligned with the calls' 100 rows
    chunked = capture_rows(x, next_ids, cs, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)  # one generator through three calls, as the vLLM worker does
    pieces = [capture_rows(x[r : r + 100], next_ids[r : r + 100], cs, gen) for r in range(0, 300, 100)]
    monkeypatch.setattr(capture, "CPU_CHUNK_BYTES", 1 << 30)
    assert reduction_rows(x.device, 3000, cs.row_chunk) >= 300  # one chunk
    whole = capture_rows(x, next_ids, cs, torch.Generator().manual_seed(3))
    for name in chunked:
        assert torch.equal(chunked[name], whole[name]), name
        assert torch.equal(torch.cat([p[name] for p in pieces]), chunked[name]), name


def test_rskd_draws_reach_ids_that_a_float32_cumulative_sum_would_lose():
    """One likely id first, then 2^21 ids of probability 5e-8 each (9.5% of the mass together): added to a running
    sum near 1 in float32, each rounds away, and torch.multinomial on float32 weights never draws them."""
    n = 1 << 21
    w = torch.full((1, n + 1), 5e-8)
    w[0, 0] = 1.0
    ids, counts = draw_samples(w, 4000, 4000, torch.Generator().manual_seed(0))
    drawn_rare = int(counts[ids > 0].sum())
    expected = 4000 * n * 5e-8 / (1 + n * 5e-8)
    assert abs(drawn_rare - expected) < 5 * expected**0.5
