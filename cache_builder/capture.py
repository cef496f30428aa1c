"""From teacher logits to the stored record of each position, on the teacher's device, in float32.

Shared by both backends (transformers and vLLM) so they write the same content. Notation: N = positions
(rows), V = real vocabulary, k = top-k, D = RS-KD draws, S = sample slots.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from cache_builder.dtypes import torch_dtype


@dataclass(frozen=True)
class CaptureSettings:
    top_k: int
    vocab_size: int  # real vocabulary (len(tokenizer)); logits rows beyond it are padding
    temperature: float = 1.0
    logprob_dtype: str = "F32"  # F32 | F16 | BF16
    sample_draws: int = 0  # D; 0 = no RS-KD samples
    sample_slots: int = 0  # S >= number of distinct ids drawn; 0 means S = D
    seed: int = 0
    row_chunk: int = 1024  # rows of [N, V] processed at once, to bound float32 temporaries

    @property
    def slots(self) -> int:
        return self.sample_slots or self.sample_draws


def sample_seed(seed: int, split: str, index: int) -> int:
    """The RS-KD seed of sequence `index` of `split`: fixed by position in the split, so a resumed
    build draws exactly what an uninterrupted one draws."""
    digest = hashlib.sha256(f"kdcache-rskd:{seed}:{split}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draw_samples(logp: torch.Tensor, draws: int, slots: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """D draws with replacement from each row's distribution -> distinct ids by count desc, id asc.

    logp: (N, V) float32 log-probs. Returns ids (N, S) int32 padded with -1 and counts (N, S) int32.
    """
    n, vocab = logp.shape
    drawn = torch.multinomial(logp.exp(), draws, replacement=True, generator=generator)  # (N, D)
    drawn, _ = drawn.sort(dim=1)
    new = torch.ones_like(drawn, dtype=torch.bool)
    new[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    group = new.long().cumsum(dim=1) - 1  # (N, D): index of each draw's distinct id within its row
    counts = torch.zeros(n, draws, dtype=torch.long, device=logp.device).scatter_add_(1, group, torch.ones_like(group))
    ids = torch.full((n, draws), -1, dtype=torch.long, device=logp.device).scatter_(1, group, drawn)
    # Order distinct ids by count descending, then id ascending; padding (count 0) goes last.
    key = torch.where(counts > 0, (draws - counts) * vocab + ids, torch.full_like(ids, draws * vocab + vocab))
    order = key.argsort(dim=1)[:, :slots]
    ids, counts = ids.gather(1, order), counts.gather(1, order)
    if draws > slots and bool((counts.sum(dim=1) != draws).any()):
        raise ValueError(f"more than {slots} distinct ids drawn in a row; raise the sample slots to {draws}")
    return ids.int(), counts.int()


def capture_rows(
    logits: torch.Tensor, next_ids: torch.Tensor, cs: CaptureSettings, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Records for N positions of one sequence.

    logits: (N, V_model) any float dtype, V_model >= V; next_ids: (N,) int64, -1 where the next token
    is unknown (the last position). Returns, on the logits' device:
      topk_ids (N, k) int32, topk_logprobs (N, k) in cs.logprob_dtype (both absent when k = 0), tail_logmass (N,) float32,
      target_logprob (N,) float32 (NaN where next_ids is -1), and with draws sample_ids (N, S) int32,
      sample_counts (N, S) int32.
    """
    out: dict[str, list[torch.Tensor]] = {}
    for start in range(0, logits.shape[0], cs.row_chunk):
        rows = logits[start : start + cs.row_chunk, : cs.vocab_size].float()  # padded vocab rows dropped
        if cs.temperature != 1.0:
            rows = rows / cs.temperature
        logp = torch.log_softmax(rows, dim=-1)  # (n, V) float32
        nxt = next_ids[start : start + cs.row_chunk]
        target = logp.gather(1, nxt.clamp(min=0).unsqueeze(1)).squeeze(1)
        target = torch.where(nxt >= 0, target, torch.full_like(target, float("nan")))
        if cs.top_k:
            top_lp, top_ids = logp.topk(cs.top_k, dim=-1, sorted=True)
            parts = {
                "topk_ids": top_ids.int(),
                "topk_logprobs": top_lp.to(torch_dtype(cs.logprob_dtype)),
                # The mass outside the top k, summed directly: 1 - sum(top-k) cancels catastrophically
                # in float32 when the top k hold nearly everything.
                "tail_logmass": torch.logsumexp(logp.scatter(1, top_ids, float("-inf")), dim=-1),
            }
        else:  # samples-only cache: everything is "tail", log 1 = 0 by definition (not a rounded logsumexp)
            parts = {"tail_logmass": torch.zeros_like(target)}
        parts["target_logprob"] = target
        if cs.sample_draws:
            parts["sample_ids"], parts["sample_counts"] = draw_samples(logp, cs.sample_draws, cs.slots, generator)
        for name, t in parts.items():
            out.setdefault(name, []).append(t)
    return {name: torch.cat(ts) for name, ts in out.items()}


def to_numpy(t: torch.Tensor):
    """Device tensor -> numpy in its storage form (BF16 as its uint16 bits)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view("<u2")
    return t.numpy()
