"""The transformers backend: any AutoModelForCausalLM folder, on CPU or GPU.

A batch of sequences is right-padded and run at once (on CPU in forwards of at most CPU_FORWARD_TOKENS padded
tokens); each sequence's valid positions then go through `capture.capture_rows` on the device, so only the
compact records (top-k, tail, target, samples, the chosen hidden layers) ever leave it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

from cache_builder.capture import CaptureSettings, capture_rows, to_numpy
from cache_builder.dtypes import resolve_dtype, torch_dtype
from cache_builder.errors import BuildError
from cache_builder.teacher import Job, resolve_device
from cache_builder.teacher_folder import check_teacher_folder, describe_folder

# On CPU a batch runs as forwards of at most this many padded tokens, so the build's progress bar moves every
# forward (with whole 8192-token batches it sat at 0% for over a minute). On a quiet 2-core machine 2048-token
# forwards of the 135M teacher cost the same per token as 8192-token ones (benchmarks/RESULTS.md, "Transformers
# builder", capture_sweep.py; an earlier run on a machine shared with other jobs had found them half as fast).
# A GPU runs the whole batch at once.
CPU_FORWARD_TOKENS = 2048
# On CPU a forward's width is rounded up to one of a few sizes: eight per octave (steps of 2^(bits - 4), at least
# CPU_WIDTH_STEP), so padding adds at most an eighth to rows of 128 tokens or more. oneDNN keeps kernels and
# buffers for every input shape it has seen, so a long bf16 build over documents of every length grew without
# bound (a bare forward over 400 random widths: 305 MiB of anonymous memory at one width, 1158 MiB at random ones,
# 463 MiB rounded as here); the padding is masked out.
CPU_WIDTH_STEP = 16


@dataclass
class HFTeacher:
    """The transformers backend of `teacher.Teacher`. `device` and `dtype` are resolved from 'auto' on creation."""

    path: str
    name: str
    dtype: str = "auto"  # compute dtype, a torch name
    device: str = "auto"
    trust_remote_code: bool = False
    model: torch.nn.Module | None = None  # set by start()

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)
        self.dtype = resolve_dtype(self.dtype, self.device)

    def describe(self) -> dict:
        """The manifest's `teacher` section, from the folder alone (no weights loaded)."""
        return describe_folder(self.path, self.name, trust_remote_code=self.trust_remote_code, dtype=self.dtype,
                               device=self.device, backend="hf",
                               backend_version=f"transformers {transformers.__version__}, torch {torch.__version__}")

    def start(self) -> None:
        try:
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch_dtype(self.dtype),
                                                         trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError) as e:
            raise BuildError(f"teacher {self.path!r}: cannot be loaded by transformers "
                             f"({str(e).splitlines()[0]})") from None
        self.model = model.to(self.device).eval()

    def run(self, batch: list[Job], cs: CaptureSettings, layers: list[int], hidden_dtype: str,
            progress: Callable[[int], None] | None = None) -> list[dict[str, np.ndarray]]:
        records = []
        for part in forward_groups(batch, CPU_FORWARD_TOKENS if self.device == "cpu" else None):
            records += forward_records(self, [j.ids for j in part], [j.seed for j in part], cs, layers, hidden_dtype,
                                       [j.next_id for j in part], progress)
        return records

    def close(self) -> None:
        self.model = None  # the weights go with the last reference


def load_hf_teacher(path: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False) -> HFTeacher:
    """A started transformers teacher, for callers outside a build (tests, benchmarks)."""
    check_teacher_folder(path)
    teacher = HFTeacher(path, Path(path).name, dtype, device, trust_remote_code)
    teacher.start()
    return teacher


def cpu_width(longest: int) -> int:
    """The width of a CPU forward whose longest row has `longest` tokens: 100 -> 112, 512 -> 512, 513 -> 576."""
    step = max(CPU_WIDTH_STEP, 1 << max(0, longest.bit_length() - 4))
    return -(-longest // step) * step


def forward_groups(batch: list[Job], max_tokens: int | None) -> list[list[Job]]:
    """Consecutive rows of `batch` whose padded size (rows x `cpu_width` of the longest) stays within `max_tokens`
    (None: one group)."""
    if max_tokens is None:
        return [batch]
    groups: list[list[Job]] = []
    for job in batch:
        group = groups[-1] if groups else None
        if group and cpu_width(max(len(j.ids) for j in group + [job])) * (len(group) + 1) <= max_tokens:
            group.append(job)
        else:
            groups.append([job])
    return groups


def forward_records(
    teacher: HFTeacher,
    rows: list[np.ndarray],
    seeds: list[int],
    cs: CaptureSettings,
    hidden_layers: list[int],
    hidden_dtype: str,
    next_after: list[int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Run one padded batch and return, per row, the stored fields of its positions.

    rows: token ids of each row (int32 (T_j,)); seeds: one RS-KD seed per row; next_after: the token
    that follows each row (a packed sequence's next document), -1 or None when unknown: the last
    position's target is then NaN. progress(T_j) is called as each row's records are made.
    """
    device = teacher.device
    lengths = [len(r) for r in rows]
    width = max(lengths)
    if device == "cpu":
        width = cpu_width(width)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.from_numpy(r.astype(np.int64))
        mask[j, : len(r)] = 1
    ids, mask = ids.to(device), mask.to(device)
    hid_dtype = torch_dtype(hidden_dtype) if hidden_layers else None
    with torch.inference_mode():
        out = teacher.model(input_ids=ids, attention_mask=mask, output_hidden_states=bool(hidden_layers), use_cache=False)
        records = []
        for j, n in enumerate(lengths):
            next_ids = torch.full((n,), -1, dtype=torch.long, device=device)
            next_ids[: n - 1] = ids[j, 1:n]
            if next_after is not None:
                next_ids[n - 1] = next_after[j]
            gen = None
            if cs.sample_draws:
                gen = torch.Generator(device=device)
                gen.manual_seed(seeds[j])
            rec = {name: to_numpy(t) for name, t in capture_rows(out.logits[j, :n], next_ids, cs, gen).items()}
            for layer in hidden_layers:
                rec[f"hidden/{layer}"] = to_numpy(out.hidden_states[layer][j, :n].to(hid_dtype))
            records.append(rec)
            if progress is not None:
                progress(n)
    return records
