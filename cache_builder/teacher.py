"""A teacher as the builder sees it: the `Teacher` interface both backends implement (teacher_hf, teacher_vllm),
the rows it runs (`Job`), and the conventions they share: the device and hidden-layer indices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from cache_builder.capture import CaptureSettings
from cache_builder.errors import BuildError


@dataclass
class Job:
    """One teacher row: a sequence, or one document segment of a packed sequence."""

    seq: int  # index of the sequence in its shard group
    start: int  # where the row starts in its sequence
    ids: np.ndarray  # (T,) int32
    next_id: int  # token after the row (inside a packed sequence), -1 when none
    seed: int  # RS-KD seed of the row


class Teacher(Protocol):
    """A teacher backend. Made from the folder alone (`build.open_teacher`): `describe` reads no weights, so a
    build checks its corpus and output before `start` loads them (or starts an engine, minutes for vLLM)."""

    def describe(self) -> dict:
        """The manifest's `teacher` section; includes `num_layers` and `hidden_size`."""

    def start(self) -> None:
        """Load the weights or start the engine."""

    def run(self, batch: list[Job], cs: CaptureSettings, layers: list[int], hidden_dtype: str,
            progress: Callable[[int], None] | None = None) -> list[dict[str, np.ndarray]]:
        """Per row of `batch`, its stored fields (`capture.capture_rows`' names, plus `hidden/L` for each
        HF hidden_states index L in `layers`, in format dtype `hidden_dtype`), one entry per position.
        `progress(tokens)` is called as rows finish, with their token count (the build's progress bar)."""

    def close(self) -> None:
        """Release the weights or stop the engine (its processes and GPUs); safe to call more than once."""


def resolve_device(device: str) -> str:
    """'auto' -> "cuda" if a GPU is visible, else "cpu"; any other name is kept."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def normalize_layers(layers: list[int], num_layers: int) -> list[int]:
    """HF hidden_states indices (0 = embeddings .. num_layers = final, after the norm); negatives count
    from the end. Returns sorted distinct non-negative indices."""
    out = set()
    for layer in layers:
        idx = layer + num_layers + 1 if layer < 0 else layer
        if not 0 <= idx <= num_layers:
            raise BuildError(
                f"--hidden-layers: layer {layer} is out of range for a teacher with {num_layers} layers "
                f"(valid: {-(num_layers + 1)} .. {num_layers})"
            )
        out.add(idx)
    return sorted(out)
