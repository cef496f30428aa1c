"""The batch one rank trains on: its tensors, their shapes, and the label that marks "not a target" (-100)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch

# A label that is not a target (past the end, outside the loss mask, the first token of the next packed
# document); PyTorch's cross_entropy skips the same value by default.
IGNORE_INDEX = -100


@dataclass
class Batch:
    """One rank's batch. B = sequences (>= 1), T = padded length, k = top-k, S = sample slots, d = hidden.

    Position i of a row holds the teacher's distribution for token i+1 (SPEC.md); `labels[b, i]` is that
    token, or -100 where it is not a target: past the end, not in the loss mask, or the first token of
    the next packed document. `kd_mask` is `labels != -100`.
    """

    input_ids: torch.Tensor  # (B, T) int64, padded with 0
    position_ids: torch.Tensor  # (B, T) int64; restarts at 0 at each packed document and for padding
    labels: torch.Tensor  # (B, T) int64
    kd_mask: torch.Tensor  # (B, T) bool
    topk_ids: torch.Tensor  # (B, T, k) int64
    topk_logprobs: torch.Tensor  # (B, T, k) float32
    tail_logmass: torch.Tensor  # (B, T) float32
    target_logprob: torch.Tensor  # (B, T) float32, 0 where not a target
    sample_ids: torch.Tensor | None = None  # (B, T, S) int64, -1 padding
    sample_counts: torch.Tensor | None = None  # (B, T, S) float32
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, T, d) float32
    doc_index: torch.Tensor | None = None  # (B,) int64; -1 for the filler row of an empty batch
    num_tokens: int = 0  # real (unpadded) tokens in the batch
    byte_offsets: torch.Tensor | None = None  # (B, T, 2) int64 when the cache has them; -1 in padding (xtok_align.py)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Batch":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = fn(v)
            elif isinstance(v, dict):
                v = {k: fn(t) for k, t in v.items()}
            out[f.name] = v
        return Batch(**out)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return self.map(lambda t: t.pin_memory())
