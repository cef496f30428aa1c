"""The two CPU sizes the transformers builder fixes, measured: rows per capture chunk and tokens per forward.

    .venv/bin/python benchmarks/capture_sweep.py [--teacher default] [--dtype auto] [--top-k 64] [--rounds 5]

- capture chunk: `capture_rows` over the real logits of one 2048-token forward (stdlib source), with
  `capture.CPU_CHUNK_BYTES` set to 2, 4, 8, 12, 16, 32 and 128 MiB per thread (see cache_builder/capture.py for the value
  it uses); the figure is this process's CPU milliseconds per 2048 rows, the median of `--rounds` interleaved rounds
  (CPU time moves less than wall time when other jobs share the cores).
- forward size: the teacher's forward over 8192 tokens as four forwards of 4 x 512 tokens (2048 each,
  teacher_hf.CPU_FORWARD_TOKENS) against one forward of 16 x 512, interleaved; CPU seconds per 1000 tokens.
Wall times are given beside. Writes its subsection of "Transformers builder" in benchmarks/RESULTS.md; the last line
is JSON with `chunk_cpu_ms`, `chunk_wall_ms` (MiB -> ms per 2048 rows), `forward_cpu_s_per_1k` and
`forward_wall_s_per_1k` (tokens per forward -> s per 1000 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from builder_hf import stdlib_corpus  # noqa: E402
from cache_builder import capture  # noqa: E402
from cache_builder.build import resolve_teacher_path  # noqa: E402
from cache_builder.capture import CaptureSettings, capture_rows  # noqa: E402
from cache_builder.teacher_hf import load_hf_teacher  # noqa: E402
from results import processor, update_subsection  # noqa: E402

SECTION = "Transformers builder"
CHUNK_MIB = (2, 4, 8, 12, 16, 32, 128)  # 128 MiB: chunks of CaptureSettings.row_chunk (1024) rows, as on a GPU


def cpu_and_wall(fn) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="default")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-results", action="store_true")
    args = ap.parse_args()

    teacher = load_hf_teacher(resolve_teacher_path(args.teacher)[0], dtype=args.dtype, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(teacher.path)
    with tempfile.TemporaryDirectory() as tmp:
        text = "\n".join(p.read_text() for p in sorted(stdlib_corpus(Path(tmp), 12_000).glob("*.txt")))
    ids = torch.tensor(tokenizer(text)["input_ids"][: 16 * 512]).view(16, 512)  # (16, 512)
    with torch.inference_mode():
        logits = teacher.model(input_ids=ids[:4]).logits.flatten(0, 1)  # (2048, V_model)
        next_ids = ids[:4].flatten().roll(-1)
        cs = CaptureSettings(top_k=args.top_k, vocab_size=len(tokenizer))

        chunk_ms: dict[int, list[tuple[float, float]]] = {mib: [] for mib in CHUNK_MIB}  # (CPU, wall)
        forward_s: dict[int, list[tuple[float, float]]] = {2048: [], 8192: []}
        for r in range(args.rounds):
            for mib in CHUNK_MIB if r % 2 == 0 else CHUNK_MIB[::-1]:
                capture.CPU_CHUNK_BYTES = mib << 20
                chunk_ms[mib].append(cpu_and_wall(lambda: capture_rows(logits, next_ids, cs)))
            for size in (2048, 8192) if r % 2 == 0 else (8192, 2048):
                per = size // 512
                forward_s[size].append(cpu_and_wall(lambda: [teacher.model(input_ids=ids[a : a + per])
                                                             for a in range(0, 16, per)]))

    def median(runs: list[tuple[float, float]], i: int, scale: float) -> float:
        return round(statistics.median(r[i] for r in runs) * scale, 3)

    figures = {"chunk_cpu_ms": {mib: median(v, 0, 1000) for mib, v in chunk_ms.items()},
               "chunk_wall_ms": {mib: median(v, 1, 1000) for mib, v in chunk_ms.items()},
               "forward_cpu_s_per_1k": {n: median(v, 0, 1 / 8.192) for n, v in forward_s.items()},
               "forward_wall_s_per_1k": {n: median(v, 1, 1 / 8.192) for n, v in forward_s.items()},
               "dtype": teacher.dtype, "threads": torch.get_num_threads()}
    lines = [f"### {processor()}: capture chunk and forward size, {teacher.dtype}", "",
             f"`.venv/bin/python benchmarks/capture_sweep.py {' '.join(sys.argv[1:])}`".replace(" `", "`"), "",
             f"Teacher {Path(teacher.path).name}, {torch.get_num_threads()} threads, top-k {args.top_k}, median of "
             f"{args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f} at the end.", "",
             "| CPU_CHUNK_BYTES per thread | CPU ms per 2048 rows | wall ms |", "|---|---|---|",
             *(f"| {mib} MiB | {ms} | {figures['chunk_wall_ms'][mib]} |"
               for mib, ms in figures["chunk_cpu_ms"].items()),
             "", "| tokens per forward | CPU s per 1000 tokens | wall s |", "|---|---|---|",
             *(f"| {n} | {sec} | {figures['forward_wall_s_per_1k'][n]} |"
               for n, sec in figures["forward_cpu_s_per_1k"].items())]
    print("\n".join(lines))
    if not args.no_results:
        update_subsection(SECTION, "\n".join(lines))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
