"""Capture throughput of the transformers backend against a bare forward pass, same model and batches.

    python benchmarks/builder_hf.py [--teacher default] [--tokens 6000] [--top-k 64] [--sample-draws 0]

Both paths run the identical length-bucketed batches the builder makes. "forward" is
`model(input_ids, attention_mask)` and nothing else; "capture" is the builder's per-batch work
(forward + log-softmax/top-k/tail/target/samples on the device + copy of the compact records to host).
The two are timed batch by batch, alternating which goes first, so a machine whose load changes during
the run biases neither. A full `run_build` of the same corpus (tokenizing, batching, writing shards in
the background thread) is timed as well. Writes the figures to benchmarks/RESULTS.md; the last line
printed is JSON with `capture_tok_s`, `forward_tok_s`, `ratio`.
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
from results import update_results  # noqa: E402


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
    ap.add_argument("--no-results", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from cache_builder.build import resolve_teacher_path, run_build
    from cache_builder.capture import CaptureSettings
    from cache_builder.corpus import tokenize_corpus
    from cache_builder.documents import CorpusOptions
    from cache_builder.records import bucketed_batches
    from cache_builder.settings import BuildSettings
    from cache_builder.teacher import Job
    from cache_builder.teacher_hf import forward_records, load_hf_teacher
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
    teacher = load_hf_teacher(path, device=args.device)
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
        return forward_records(teacher, [j.ids for j in batch], [j.seed for j in batch], cs, [], "BF16")

    forward(batches[-1])  # warm-up: allocator, kernels
    t_fwd = t_cap = 0.0
    for i, batch in enumerate(batches):
        order = (forward, capture) if i % 2 == 0 else (capture, forward)
        for fn in order:
            t0 = time.perf_counter()
            fn(batch)
            dt = time.perf_counter() - t0
            if fn is forward:
                t_fwd += dt
            else:
                t_cap += dt
    fwd_tok_s, cap_tok_s = total / t_fwd, total / t_cap

    out = tmp / "cache"
    t0 = time.perf_counter()
    run_build(BuildSettings(teacher=args.teacher, corpus=[str(corpus)], out=str(out), top_k=args.top_k,
                            sample_draws=args.sample_draws, seq_len=args.seq_len, max_batch_tokens=args.max_batch_tokens,
                            device=args.device, progress=False))
    build_s = time.perf_counter() - t0
    from formats.reader import open_cache

    built_tokens = open_cache(out).manifest.totals()["tokens"]
    device = teacher.device if teacher.device == "cpu" else torch.cuda.get_device_name()
    figures = {
        "capture_tok_s": round(cap_tok_s, 1),
        "forward_tok_s": round(fwd_tok_s, 1),
        "ratio": round(cap_tok_s / fwd_tok_s, 3),
        "build_end_to_end_tok_s": round(built_tokens / build_s, 1),
        "tokens": total,
        "batches": len(batches),
    }
    print(f"teacher {args.teacher} on {device}: {total} tokens in {len(batches)} batches (top-k {args.top_k}, "
          f"draws {args.sample_draws})")
    print(f"bare forward   {fwd_tok_s:9.1f} tok/s")
    print(f"capture        {cap_tok_s:9.1f} tok/s   ratio {cap_tok_s / fwd_tok_s:.3f} (goal >= 0.9)")
    print(f"whole build    {built_tokens / build_s:9.1f} tok/s   ({built_tokens} tokens incl. model load, tokenizing, writing)")
    if not args.no_results:
        cmd = "python benchmarks/builder_hf.py " + " ".join(sys.argv[1:])
        machine = f"{device}, {os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__}"
        table = "\n".join(f"| {k} | {v} |" for k, v in figures.items())
        update_results("Transformers builder", f"Command: `{cmd.strip()}`  \nMachine: {machine}\n\n| figure | value |\n|---|---|\n{table}\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
