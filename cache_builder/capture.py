"""From teacher logits to the stored record of each position, on the teacher's device, in float32.

Shared by both backends (transformers and vLLM) so they write the same content. Notation: N = positions
(rows), V = real vocabulary, k = top-k, D = RS-KD draws, S = sample slots.

The reduction reads each row's logits a few times and takes one exp of each, on the raw logits where that is
exact: the top-k of the logits is the top-k of the log-probs (log_softmax(x) = x - m - log s is a shift) and gives
the row's maximum m too; torch's softmax kernel then turns the row into p = exp(x - m) / s in place, taking max, exp
and sum while the row is in cache (the separate exp of every element cost more than the rest of the reduction), so
p at the top id is 1 / s and gives log s. The tail is the sum of p outside the top k, summed directly (never
1 - sum(top k), which cancels when the top k hold nearly all the mass; rows whose tail falls below float32's range
relative to m get a logsumexp of their own), and s is renormalised to tail + top k, two positive parts; the target
is x[next] - m - log s; the RS-KD draws come from p itself, in float64 (see `draw_samples`). All of it accumulates
in float32. Rows are reduced a hundred or so at a time on CPU in one reused float32 buffer (`reduction_rows`), and
the top-k there is a search by levels (`top_k`). The vLLM route computes the logits `CaptureSettings.row_chunk`
rows at a time and the transformers route one sequence at a time; either way this runs where the logits are.
benchmarks/RESULTS.md ("Transformers builder", "vLLM builder") has the figures.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from cache_builder.dtypes import torch_dtype

# Float32 bytes of the rows one CPU thread reduces at a time (at most row_chunk rows): the buffer is reused across
# chunks, so no call allocates (and page-faults) a fresh (n, V) block, and each torch call gets enough rows to be
# worth its overhead and its threads' start. Of 2 to 128 MiB, 8 and 12 MiB (85 and 128 rows of V = 49152 on 2
# threads) ran fastest in three sweeps on an AMD EPYC, within 5% of each other (each the faster in some), and 32 MiB
# or more 1.1-1.6x slower. On a quiet Xeon an older reduction gave the builder a capture/forward ratio of 0.885 at
# 4 MiB and 0.785 at 32 MiB, hence the smaller of the two (benchmarks/RESULTS.md, "Transformers builder",
# capture_sweep.py and builder_hf.py).
CPU_CHUNK_BYTES = 8 << 20
# The reduction works on p = exp(x - m) / s, where s <= V: a probability below float32's smallest normal (~1.2e-38)
# loses precision and below ~1.4e-45 vanishes, so relative to the top one (exp(0) = 1) terms below 1.2e-38 * V may be
# lost, at most V of them: 1.2e-38 * V^2, under 1.2e-26 for V up to 10^6. A tail below this (relative to the top
# one) could be off by more than 1e-8 of itself: such rows get their tail from a logsumexp with its own maximum.
TINY_TAIL = 1e-18


@dataclass(frozen=True)
class CaptureSettings:
    top_k: int
    vocab_size: int  # real vocabulary (len(tokenizer)); logits rows beyond it are padding
    temperature: float = 1.0
    logprob_dtype: str = "F32"  # F32 | F16 | BF16
    sample_draws: int = 0  # D; 0 = no RS-KD samples
    sample_slots: int = 0  # S >= number of distinct ids drawn; 0 means S = D
    seed: int = 0
    row_chunk: int = 1024  # rows of [N, V] whose logits exist at once (the vLLM head; the reduction on a GPU)

    @property
    def slots(self) -> int:
        return self.sample_slots or self.sample_draws


def sample_seed(seed: int, split: str, index: int) -> int:
    """The RS-KD seed of sequence `index` of `split`: fixed by position in the split, so a resumed
    build draws exactly what an uninterrupted one draws."""
    digest = hashlib.sha256(f"kdcache-rskd:{seed}:{split}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draw_samples(weights: torch.Tensor, draws: int, slots: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """D draws with replacement from each row's distribution -> distinct ids by count desc, id asc.

    weights: (N, V), proportional to the probabilities (e.g. exp(x - max x)). Returns ids (N, S) int32 padded
    with -1 and counts (N, S) int32. The weights go to torch.multinomial in float64: it sums them into a
    cumulative distribution in their own dtype, and in float32 every id after the running sum nears 1 with a
    probability below ~3e-8 would be lost (never drawn), and those near it distorted.
    """
    n, vocab = weights.shape
    drawn = torch.multinomial(weights.double(), draws, replacement=True, generator=generator)  # (N, D)
    drawn, _ = drawn.sort(dim=1)
    new = torch.ones_like(drawn, dtype=torch.bool)
    new[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    group = new.long().cumsum(dim=1) - 1  # (N, D): index of each draw's distinct id within its row
    counts = torch.zeros(n, draws, dtype=torch.long, device=weights.device).scatter_add_(1, group, torch.ones_like(group))
    ids = torch.full((n, draws), -1, dtype=torch.long, device=weights.device).scatter_(1, group, drawn)
    # Order distinct ids by count descending, then id ascending; padding (count 0) goes last.
    key = torch.where(counts > 0, (draws - counts) * vocab + ids, torch.full_like(ids, draws * vocab + vocab))
    order = key.argsort(dim=1)[:, :slots]
    ids, counts = ids.gather(1, order), counts.gather(1, order)
    if draws > slots and bool((counts.sum(dim=1) != draws).any()):
        raise ValueError(f"more than {slots} distinct ids drawn in a row; raise the sample slots to {draws}")
    return ids.int(), counts.int()


def top_k(x: torch.Tensor, k: int, block: int = 64, sub: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of x (n, V), sorted descending: values (n, k), ids (n, k) int64.

    On CPU a search by levels, exact: the top k lie in the k blocks (of `block` consecutive ids) with the largest
    maxima (a block holding one of them has a maximum at least as large, and only k - 1 entries are larger); the
    same holds for the sub-blocks of `sub` ids within those, so torch.topk runs over k * sub candidates (plus the
    ids past the last whole block) instead of all V. Equal values may come out in another order than torch.topk's.
    On a GPU torch.topk itself.
    """
    n, vocab = x.shape
    blocks = vocab // block
    if x.device.type != "cpu" or blocks < 4 * k:
        return x.topk(k, dim=1)
    whole, per = blocks * block, k * block // sub
    rows = torch.arange(n, device=x.device)[:, None]
    grid = x[:, :whole].unflatten(1, (blocks, block))  # (n, V/block, block)
    # Which blocks, not their order: unsorted selections cost a quarter of this function less.
    _, best = grid.amax(dim=2).topk(k, dim=1, sorted=False)  # (n, k) the blocks with the largest maxima
    if whole == vocab and x.is_contiguous():  # rows of (n * V/block, block), copied whole
        cand = grid.flatten(0, 1).index_select(0, (best + rows * blocks).flatten())
    else:
        cand = grid[rows, best]  # (n, k, block)
    cand = cand.reshape(n * per, sub)  # the k blocks' sub-blocks
    # (n, k) the sub-blocks with the largest maxima
    _, best_sub = cand.view(n, per, sub).amax(dim=2).topk(k, dim=1, sorted=False)
    cand = cand.index_select(0, (best_sub + rows * per).flatten()).view(n, k * sub)
    if whole < vocab:  # the ids past the last whole block are always candidates
        cand = torch.cat([cand, x[:, whole:]], dim=1)
    values, pos = cand.topk(k, dim=1)  # (n, k)
    in_grid = pos < k * sub
    at = torch.where(in_grid, pos, 0)
    within = best_sub.gather(1, at // sub) * sub + at % sub  # (n, k) index among the k blocks' k * block ids
    ids = best.gather(1, within // block) * block + within % block
    return values, torch.where(in_grid, ids, pos - k * sub + whole)


def reduction_rows(device: torch.device, vocab: int, row_chunk: int) -> int:
    """Rows reduced at once: on CPU CPU_CHUNK_BYTES of float32 per thread, on a GPU `row_chunk` (its kernels want
    many rows per launch); never more than `row_chunk`."""
    if device.type != "cpu":
        return row_chunk
    return max(1, min(row_chunk, CPU_CHUNK_BYTES * torch.get_num_threads() // (4 * vocab)))


def capture_rows(
    logits: torch.Tensor, next_ids: torch.Tensor, cs: CaptureSettings, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Records for N positions of one sequence.

    logits: (N, V_model) any float dtype, V_model >= V; next_ids: (N,) int64, -1 where the next token
    is unknown (the last position). Returns, on the logits' device:
      topk_ids (N, k) int32, topk_logprobs (N, k) in cs.logprob_dtype (both absent when k = 0), tail_logmass (N,) float32,
      target_logprob (N,) float32 (NaN where next_ids is -1), and with draws sample_ids (N, S) int32,
      sample_counts (N, S) int32.
    The draws consume the generator row by row, so they do not depend on how the rows are chunked on CPU.
    """
    n_all, k, vocab = logits.shape[0], cs.top_k, cs.vocab_size
    device = logits.device
    rows = reduction_rows(device, vocab, cs.row_chunk)
    buf = torch.empty(min(rows, n_all), vocab, dtype=torch.float32, device=device)  # the one working buffer
    # Per row, relative to its largest logit m: the top k, log s (s = sum of e = exp(x - m)), the tail's sum of e,
    # the target's x - m. Filled chunk by chunk; the log-probs are formed once at the end.
    top = torch.empty(n_all, k, device=device)
    ids = torch.empty(n_all, k, dtype=torch.long, device=device)
    m, log_s, tail, target = (torch.empty(n_all, device=device) for _ in range(4))
    nxt = next_ids.clamp(min=0)[:, None]  # (N, 1)
    samples = []
    for start in range(0, n_all, rows):
        end = min(start + rows, n_all)
        e = buf[: end - start]
        e.copy_(logits[start:end, :vocab])  # (n, V) float32; padded vocabulary rows dropped
        if cs.temperature != 1.0:
            e.div_(cs.temperature)
        if k:  # the top-k of the raw logits is the top-k of the log-probs (a shift apart)
            top[start:end], ids[start:end] = top_k(e, k)
            m[start:end] = top[start:end, 0]
        else:
            m[start:end] = e.amax(dim=1)
        target[start:end] = e.gather(1, nxt[start:end])[:, 0] - m[start:end]
        # p = exp(x - m) / s in one fused kernel per row (max, exp and sum while the row is in cache), in place
        softmax_(e)
        if k:  # p of the top k, the largest first: exp(0) / s = 1 / s
            p_top = e.gather(1, ids[start:end])
            p_max, inside = p_top[:, 0], p_top.sum(dim=1)
        else:
            p_max = e.amax(dim=1)
        if cs.sample_draws:
            samples.append(draw_samples(e, cs.sample_draws, cs.slots, generator))
        if k:
            e.scatter_(1, ids[start:end], 0.0)
            tail_p = e.sum(dim=1)  # the mass outside the top k, summed directly
            # In units of exp(x - m): s = tail + top k, two positive parts, no cancellation.
            tail[start:end] = tail_p / p_max
            log_s[start:end] = (tail_p + inside).log() - p_max.log()
        else:
            log_s[start:end] = e.sum(dim=1).log() - p_max.log()
    out = {}
    if k:
        tail_logmass = tail.log() - log_s
        tiny = (tail < TINY_TAIL) & (k < vocab)
        if bool(tiny.any()):
            tail_logmass[tiny] = _exact_tail(logits[tiny, :vocab], ids[tiny], cs.temperature) - (m + log_s)[tiny]
        out["topk_ids"] = ids.int()
        out["topk_logprobs"] = ((top - m[:, None]) - log_s[:, None]).to(torch_dtype(cs.logprob_dtype))
        out["tail_logmass"] = tail_logmass
    else:  # samples-only cache: everything is "tail", log 1 = 0 by definition (not a rounded logsumexp)
        out["tail_logmass"] = torch.zeros_like(log_s)
    out["target_logprob"] = torch.where(next_ids >= 0, target - log_s, torch.nan)
    if samples:
        out["sample_ids"], out["sample_counts"] = (torch.cat(parts) for parts in zip(*samples))
    return out


def softmax_(e: torch.Tensor) -> None:
    """Rows of e become their softmax, in place. The CPU kernel maps each element to the same index of its output,
    after the row's max and sum are taken, so it may write over its input (no second (n, V) buffer)."""
    if e.device.type == "cpu":
        torch.ops.aten._softmax.out(e, 1, False, out=e)
    else:
        e.copy_(torch.softmax(e, dim=1))


def _exact_tail(x: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log of the sum of exp(x / T) outside `ids`, each row with its own maximum (rows whose tail is tiny)."""
    z = x.float() / temperature if temperature != 1.0 else x.float()
    return torch.logsumexp(z.scatter(1, ids, float("-inf")), dim=1)


def to_numpy(t: torch.Tensor):
    """Device tensor -> numpy in its storage form (BF16 as its uint16 bits)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view("<u2")
    return t.numpy()
