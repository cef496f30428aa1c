"""Capture throughput of the transformers backend against a bare forward pass, same model and batches.

    python benchmarks/builder_hf.py [--teacher default] [--tokens 6000] [--top-k 64] [--sample-draws 0] [--dtype auto]

Both paths run the identical length-bucketed batches the builder makes. "forward" is
`model(input_ids, attention_mask)` and nothing else; "capture" is the builder's per-batch work, `HFTeacher.run`
(forward + top-k/tail/target/samples on the device + copy of the compact records to host).
The two are timed batch by batch, alternating which goes first, so a machine whose load changes during
the run biases neither. A full `run_build` of the same corpus (tokenizing, batching, writing shards in
the background thread) is timed as well. `--dtype` is the teacher's compute dtype, as `kdcache build --dtype`
(auto: bf16 on a GPU or a CPU with native bf16, else fp32). Writes the figures to the subsection of the
processor and dtype in benchmarks/RESULTS.md ("Transformers builder"); the last line printed is JSON with
`capture_tok_s`, `forward_tok_s`, `ratio`, `cpu_ratio` (the same ratio in this process's CPU seconds, which
other jobs on a shared machine move less than wall time), `dtype`.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import processor, update_subsection  # noqa: E402


def stdlib_corpus(folder: Path, tokens: int) -> Path:
    """Real text nobody here wrote: source files of the running Python's standard library."""
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(Path(os.__file__).parent.glob("*.py"))
    chars = 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")[:20000]
        (folder / (f.stem + ".txt")).write_text(text, encoding="utf-8")
        chars += len(text)
        if chars > tokens * 4:  # ~3.5-4 characters per token for code
            break
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="default")
    ap.add_argument("--tokens", type=int, default=6000)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--sample-draws", type=int, default=0)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-batch-tokens", type=int, default=2048)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="teacher compute dtype: auto, float32, bfloat16, float16")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, one per core)")
    ap.add_argument("--rounds", type=int, default=2, help="passes over the batches, forward and capture alternating")
    ap.add_argument("--no-results", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]  # other jobs on a shared machine: named beside the figures

    import torch
    from transformers import AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)

    from cache_builder.build import resolve_teacher_path, run_build
    from cache_builder.capture import CaptureSettings
    from cache_builder.corpus import tokenize_corpus
    from cache_builder.documents import CorpusOptions
    from cache_builder.records import bucketed_batches
    from cache_builder.settings import BuildSettings
    from cache_builder.teacher import Job
    from cache_builder.teacher_hf import load_hf_teacher
    from formats.tokenizer import tokenizer_info

    tmp = Path(tempfile.mkdtemp(prefix="kdcache-bench-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # caches of hundreds of MB
    corpus = stdlib_corpus(tmp / "corpus", args.tokens)
    path, _ = resolve_teacher_path(args.teacher)
    tokenizer = AutoTokenizer.from_pretrained(path)
    seqs = list(tokenize_corpus(CorpusOptions(paths=[str(corpus)], seq_len=args.seq_len), tokenizer))
    total = 0
    jobs = []
    for j, q in enumerate(seqs):
        if total >= args.tokens:
            break
        jobs.append(Job(j, 0, q.input_ids, -1, j))
        total += len(q.input_ids)
    batches = bucketed_batches(jobs, args.max_batch_tokens)
    teacher = load_hf_teacher(path, dtype=args.dtype, device=args.device)
    cs = CaptureSettings(top_k=args.top_k, vocab_size=tokenizer_info(tokenizer)["vocab_size"],
                         sample_draws=args.sample_draws)

    def forward(batch):
        width = max(len(j.ids) for j in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, j in enumerate(batch):
            ids[r, : len(j.ids)] = torch.from_numpy(j.ids.astype("int64"))
            mask[r, : len(j.ids)] = 1
        with torch.inference_mode():
            out = teacher.model(input_ids=ids.to(teacher.device), attention_mask=mask.to(teacher.device), use_cache=False)
        if teacher.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    def capture(batch):
        return teacher.run(batch, cs, [], "BF16")

    forward(batches[-1])  # warm-up: allocator, kernels
    wall = {forward: 0.0, capture: 0.0}
    cpu = {forward: 0.0, capture: 0.0}  # this process's CPU seconds: less moved by other jobs on a shared machine
    for i, batch in enumerate(batches * args.rounds):
        for fn in (forward, capture) if i % 2 == 0 else (capture, forward):
            t0, c0 = time.perf_counter(), time.process_time()
            fn(batch)
            wall[fn] += time.perf_counter() - t0
            cpu[fn] += time.process_time() - c0
    fwd_tok_s, cap_tok_s = total * args.rounds / wall[forward], total * args.rounds / wall[capture]

    out = tmp / "cache"
    t0 = time.perf_counter()
    run_build(BuildSettings(teacher=args.teacher, corpus=[str(corpus)], out=str(out), top_k=args.top_k,
                            sample_draws=args.sample_draws, seq_len=args.seq_len, max_batch_tokens=args.max_batch_tokens,
                            device=args.device, dtype=args.dtype, progress=False))
    build_s = time.perf_counter() - t0
    from formats.reader import open_cache

    built_tokens = open_cache(out).manifest.totals()["tokens"]
    machine = processor()
    figures = {
        "capture_tok_s": round(cap_tok_s, 1),
        "forward_tok_s": round(fwd_tok_s, 1),
        "ratio": round(cap_tok_s / fwd_tok_s, 3),
        "cpu_ratio": round(cpu[forward] / cpu[capture], 3),
        "build_end_to_end_tok_s": round(built_tokens / build_s, 1),
        "tokens": total,
        "batches": len(batches),
        "dtype": teacher.dtype,
    }
    print(f"teacher {args.teacher} on {teacher.device} ({machine}), {teacher.dtype}: {total} tokens in {len(batches)} "
          f"batches (top-k {args.top_k}, draws {args.sample_draws}, {torch.get_num_threads()} threads)")
    print(f"bare forward   {fwd_tok_s:9.1f} tok/s")
    print(f"capture        {cap_tok_s:9.1f} tok/s   ratio {cap_tok_s / fwd_tok_s:.3f} (goal >= 0.9); in CPU seconds "
          f"{figures['cpu_ratio']:.3f}")
    print(f"whole build    {built_tokens / build_s:9.1f} tok/s   ({built_tokens} tokens incl. model load, tokenizing, writing)")
    if not args.no_results:
        cmd = "python benchmarks/builder_hf.py " + " ".join(sys.argv[1:])
        table = "\n".join(f"| {k} | {v} |" for k, v in figures.items())
        update_subsection("Transformers builder", f"### {machine}: {teacher.dtype}\n\nCommand: `{cmd.strip()}`  \n"
                          f"Teacher on {teacher.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                          f"load average {load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after, "
                          f"{platform.machine()}; top-k {args.top_k}, draws {args.sample_draws}.\n\n"
                          f"| figure | value |\n|---|---|\n{table}\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
