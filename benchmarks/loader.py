"""Loader throughput: collated training batches per second against the ceiling of the same shard bytes.

    python benchmarks/loader.py [--tokens 200000] [--workers 0 1 2] [--repeats 3] [--batch-size 8]
                                [--variants plain full compact] [--no-results]

Caches: synthetic, shaped like a SmolLM2 teacher's (benchmarks/loader_caches.py): "plain" (top-k 64, BF16),
"full" (plus RS-KD samples and a hidden layer), "compact" (the plain top-k with the compact encoding, 6-bit codes);
each written once as Parquet and once as Zarr, in a temporary folder.

Measured, per backend and variant, in one run:
- ceiling (benchmarks/loader_ceiling.py): one core reading every shard file from the page cache and
  zstd-decompressing every page / chunk in it, and for the compact variant decoding its top-k as well (decoding
  it is part of decompressing it); no collation, batching or hand-over;
- loader: `EpochReader.batches` for one epoch with 1 and 2 worker processes (and 0, in-process), tokens
  per second of real (unpadded) tokens delivered as collated tensors, every page of every tensor touched by
  the consumer; steady state only (`loader_run`: worker start-up, i.e. spawning and importing torch, is
  reported apart, and the windows read ahead at either end are left out of the clock);
- where the time goes, in a process set up as a worker, on the same blocks: decode (`read_range`:
  decompress + direct page / shard-index reads to numpy, + the compact decode), collate (padding, shifting,
  int32->int64, BF16->F32 into the window's buffer), and the transfer from a worker to the trainer (torch's
  multiprocessing pickler: the window's buffer descriptor, mapped on the other side, Batch views, pages
  touched, buffer handed back);
- the demo student's consumption: training steps of a 4-layer student derived from the demo teacher
  (`student_from_teacher`), batch 4 x 256 tokens, forward-KL loss with ghost tail on top-64, AdamW, on
  this CPU: tokens per second it consumes.

Every cache's ceiling and loader runs are repeated `--repeats` times, interleaved (the machine is shared);
figures are medians. The last line printed is JSON with `ratio_to_ceiling` (loader tok/s / ceiling tok/s,
worst case over backends and the plain and full variants, best worker count each), `compact_ratio_to_ceiling`
(the same over the compact variant's backends, against its ceiling with the compact decode),
`compact_ratio_to_zstd_ceiling` (the same against its read + zstd ceiling alone), `compact_over_plain_ceiling` (the
compact loader's tok/s over the plain variant's ceiling, same tokens and backend) and `over_demo_consumption` (the
slowest loader figure / the demo student's tok/s), plus every figure. Writes its section of benchmarks/RESULTS.md
(benchmarks/loader_report.py).
"""

from __future__ import annotations

import argparse
import atexit
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loader_caches import K, LAYER, VARIANTS, VOCAB, write_cache  # noqa: E402
from loader_ceiling import ceiling  # noqa: E402
from loader_report import write_results  # noqa: E402

from formats.reader import open_cache  # noqa: E402
from student_trainer.collate import PackedBatches  # noqa: E402
from student_trainer.loader import EpochReader, LoaderSettings  # noqa: E402
from student_trainer.losses import fkl_ghost  # noqa: E402
from student_trainer.memory import keep_freed_memory  # noqa: E402

SHUFFLE_BLOCKS = 1  # one read block (~16k tokens) per window: many windows, so start-up can be left out


def touch(batch) -> int:
    """Read one value from every 4 KiB page of every tensor of the batch, as a trainer's copy to the device would
    read them: a worker's buffer is mapped into the trainer process page by page on first access, and that
    cost belongs to the loader (the rest of reading every byte is the trainer's own copy, the same for any loader)."""
    total = 0
    tensors = [batch.input_ids, batch.position_ids, batch.labels, batch.kd_mask, batch.topk_ids, batch.topk_logprobs,
               batch.tail_logmass, batch.target_logprob, batch.sample_ids, batch.sample_counts, *batch.hidden.values()]
    for t in tensors:
        if t is not None and t.numel():
            flat = t.reshape(-1)
            total += int(flat[:: max(1, 4096 // t.element_size())].to(torch.float64).sum().isfinite())
    return total


def loader_run(url: str, workers: int, batch_size: int, hidden: list[int]) -> dict:
    """One epoch through `EpochReader.batches`, every batch touched (`touch`); steady-state tokens per second.

    The clock runs from the delivery of window `lead` to that of window `n - tail`, and counts the tokens of
    the windows in between: `lead` = the windows the workers began with at start-up (spawning, importing torch
    and opening the cache are start-up, reported apart; 1 without workers, whose first window opens the shard
    readers), `tail` = as many windows as there are workers, because while they drain the last windows the
    pipeline is no longer full. Windows are read ahead (two per worker), so a clock started after start-up
    and stopped at the very end would credit the loader with work done before it started."""
    reader = EpochReader(url, "train", LoaderSettings(batch_size=batch_size, shuffle_blocks=SHUFFLE_BLOCKS,
                                                      num_workers=workers, prefetch=4), hidden_layers=hidden)
    sizes = [len(task.batches) for task, _ in reader.tasks(0)]
    ends = np.cumsum(sizes)  # batch count at the end of each window
    lead, tail = max(workers, 1), workers
    if len(sizes) < lead + tail + 2:
        raise SystemExit(f"{url}: {len(sizes)} windows are too few to measure {workers} workers; use more --tokens")
    t0 = time.perf_counter()
    done = []  # (time the window's last batch was delivered, its tokens)
    tokens = i = 0
    for i, b in enumerate(reader.batches(epoch=0)):
        touch(b)
        tokens += b.num_tokens
        if i + 1 == ends[len(done)]:
            done.append((time.perf_counter(), tokens))
            tokens = 0
        del b
    assert i + 1 == ends[-1] and len(done) == len(sizes)
    start, stop = done[lead - 1][0], done[len(sizes) - tail - 1][0]
    timed = sum(n for _, n in done[lead : len(sizes) - tail])
    return {"workers": workers, "startup_s": start - t0, "tokens": sum(n for _, n in done), "timed_tokens": timed,
            "windows": len(sizes), "tok_s": timed / (stop - start)}


def breakdown(url: str, batch_size: int, hidden: list[int]) -> dict:
    """Seconds per million tokens for decode, collate and worker->trainer transfer, in a process of its own set
    up as a loader worker (`keep_freed_memory`), both ends of the transfer in it: pickling the window (its
    buffer's descriptor), unpickling it (mapping the buffer), the Batch views, every page touched, and the
    window let go of (which hands its buffer back to the pool)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_breakdown, (url, batch_size, hidden))


def _breakdown(url: str, batch_size: int, hidden: list[int]) -> dict:
    keep_freed_memory()
    cache = open_cache(url)
    fields = cache.manifest.fields
    best = None
    for _ in range(3):  # the machine is shared: the fastest of three passes (the first also warms the pool)
        t_dec = t_col = t_xfer = 0.0
        tokens = 0
        for entry in cache.shards("train"):
            shard = cache.open_shard(entry)
            for start, stop in shard.block_ranges():
                t0 = time.perf_counter()
                block = shard.read_range(start, stop)
                t1 = time.perf_counter()
                packed = PackedBatches([[block.get(j) for j in range(i, min(i + batch_size, len(block)))]
                                        for i in range(0, len(block), batch_size)], hidden, 0, fields, shared=True)
                t2 = time.perf_counter()
                received = ForkingPickler.loads(bytes(ForkingPickler.dumps(packed)))
                for i in range(len(received)):
                    touch(received[i])
                del received, packed
                t3 = time.perf_counter()
                t_dec, t_col, t_xfer = t_dec + t1 - t0, t_col + t2 - t1, t_xfer + t3 - t2
                tokens += block.num_tokens
        per_m = 1e6 / tokens
        now = {"decode_s_per_mtok": t_dec * per_m, "collate_s_per_mtok": t_col * per_m, "transfer_s_per_mtok": t_xfer * per_m}
        best = now if best is None else {k: min(v, now[k]) for k, v in best.items()}
    return best


# ------------------------------------------------------------------------------------------- the demo student


def demo_consumption(steps: int = 3, batch: int = 4, seq: int = 256, k: int = K) -> dict:
    """Tokens per second a 4-layer student derived from the demo teacher trains on, on this machine."""
    # These import transformers: deferred, so the loader's worker processes (spawned, which re-imports this
    # script) start as they would under a trainer.
    from cache_builder.build import resolve_teacher_path
    from student_trainer.student import student_from_teacher

    path, _ = resolve_teacher_path("default")
    model = student_from_teacher(path, 4)
    model = model[0]  # (model, tokenizer, info)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    topk_ids = torch.randint(0, VOCAB, (batch, seq, k), generator=g)
    topk_lp = torch.log_softmax(torch.randn(batch, seq, k + 1, generator=g), -1)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    times = []
    for _ in range(steps + 1):  # the first step warms the allocator and is not counted
        t0 = time.perf_counter()
        logits = model(input_ids=ids).logits
        loss = fkl_ghost(logits, topk_ids, topk_lp[..., :k], topk_lp[..., k], mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    step_s = float(np.mean(times[1:]))
    return {"step_s": step_s, "tok_s": batch * seq / step_s, "batch": batch, "seq": seq, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=200_000, help="tokens per cache")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--repeats", type=int, default=3, help="rounds of ceiling and loader runs, interleaved over all caches")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                    help="caches to measure (RESULTS.md is written only when all are)")
    ap.add_argument("--demo-steps", type=int, default=3)
    ap.add_argument("--no-results", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kdcache-loader-bench-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # caches of hundreds of MB
    rows = []
    for variant in args.variants:
        for backend in ("parquet", "zarr"):
            t0 = time.perf_counter()
            url = write_cache(tmp / f"{variant}-{backend}", backend, variant, args.tokens)
            print(f"[{variant}/{backend}] cache written in {time.perf_counter() - t0:.1f} s", flush=True)
            rows.append({"variant": variant, "backend": backend, "url": url, "hidden": [LAYER] if variant == "full" else [],
                         "ceilings": [], "runs": {w: [] for w in args.workers}})
    # The machine is shared: every round measures every cache's ceiling and every worker count in turn, so a
    # busy spell hits all of them alike; figures are medians over the rounds, with their spread.
    for rnd in range(args.repeats):
        for row in rows:
            row["ceilings"].append(ceiling(row["url"]))
            for w in args.workers:
                row["runs"][w].append(loader_run(row["url"], w, args.batch_size, row["hidden"]))
            print(f"round {rnd} [{row['variant']}/{row['backend']}] ceiling {row['ceilings'][-1]['tok_s']:,.0f} tok/s; "
                  + ", ".join(f"{w}w {row['runs'][w][-1]['tok_s']:,.0f}" for w in args.workers), flush=True)
    for row in rows:
        summarize(row, args.workers)
        row["breakdown"] = breakdown(row["url"], args.batch_size, row["hidden"])
        c = row["ceiling"]
        print(f"[{row['variant']}/{row['backend']}] ceiling {c['tok_s']:,.0f} tok/s (read {c['read_s']:.3f} s, decompress "
              f"{c['decompress_s']:.3f} s, {c['decompress_gb_s']:.2f} GB/s, compact decode {c['compact_decode_s']:.3f} s); "
              + ", ".join(f"{w}w {row['median'][w]:,.0f} tok/s" for w in args.workers)
              + f"; ratio {row['ratio']:.2f} (to read + zstd alone {row['zstd_ratio']:.2f}); breakdown s/Mtok "
              + json.dumps({k: round(v, 2) for k, v in row["breakdown"].items()}), flush=True)
    demo = demo_consumption(args.demo_steps)
    print(f"demo student: {demo['tok_s']:.0f} tok/s ({demo['step_s']:.2f} s per step of {demo['batch']}x{demo['seq']})", flush=True)
    figures = summary_figures(rows, demo, args.repeats)
    if not args.no_results and set(args.variants) == set(VARIANTS):
        write_results(args, rows, demo, figures, torch.__version__, SHUFFLE_BLOCKS)
    print(json.dumps(figures))


def summarize(row: dict, workers: list[int]) -> None:
    """Medians over the rounds, and the ratios, into `row`."""
    row["ceiling"] = _median_by(row["ceilings"], "tok_s")
    row["median"] = {w: float(np.median([r["tok_s"] for r in runs])) for w, runs in row["runs"].items()}
    row["spread"] = {w: (min(r["tok_s"] for r in runs), max(r["tok_s"] for r in runs)) for w, runs in row["runs"].items()}
    with_workers = [w for w in workers if w > 0] or workers
    row["best_workers"] = max(with_workers, key=lambda w: row["median"][w])
    row["best_tok_s"] = row["median"][row["best_workers"]]
    row["ratio"] = row["best_tok_s"] / row["ceiling"]["tok_s"]
    row["zstd_ratio"] = row["best_tok_s"] / float(np.median([c["zstd_tok_s"] for c in row["ceilings"]]))
    # the same ratio from each round's own figures, to show how far the noise moves it
    row["round_ratios"] = [max(row["runs"][w][i]["tok_s"] for w in with_workers) / c["tok_s"]
                           for i, c in enumerate(row["ceilings"])]


def summary_figures(rows: list[dict], demo: dict, repeats: int) -> dict:
    """The last line's JSON: the goals' ratios and every figure."""
    plain_rows = [r for r in rows if r["variant"] != "compact"]  # the loader goal's caches, as before format 1.2
    compact_rows = [r for r in rows if r["variant"] == "compact"]
    plain_ceiling = {r["backend"]: r["ceiling"]["tok_s"] for r in rows if r["variant"] == "plain"}
    figures = {
        "ratio_to_ceiling": round(min(r["ratio"] for r in plain_rows), 3) if plain_rows else None,
        "compact_ratio_to_ceiling": round(min(r["ratio"] for r in compact_rows), 3) if compact_rows else None,
        "compact_ratio_to_zstd_ceiling": round(min(r["zstd_ratio"] for r in compact_rows), 3) if compact_rows else None,
        "compact_over_plain_ceiling": round(min(r["best_tok_s"] / plain_ceiling[r["backend"]] for r in compact_rows), 3)
        if compact_rows and plain_ceiling else None,
        "over_demo_consumption": round(min(r["best_tok_s"] for r in rows) / demo["tok_s"], 1),
        "demo_tok_s": round(demo["tok_s"], 1),
        "loader_tok_s": {f"{r['variant']}/{r['backend']}/{w}w": round(v) for r in rows for w, v in r["median"].items()},
        "ceiling_tok_s": {f"{r['variant']}/{r['backend']}": round(r["ceiling"]["tok_s"]) for r in rows},
        "zstd_ceiling_tok_s": {f"{r['variant']}/{r['backend']}": round(r["ceiling"]["zstd_tok_s"]) for r in compact_rows},
        "ratio": {f"{r['variant']}/{r['backend']}": round(r["ratio"], 3) for r in rows},
        "tokens": rows[0]["ceiling"]["tokens"],
        "repeats": repeats,
        "round_ratios": {f"{r['variant']}/{r['backend']}": [round(x, 3) for x in r["round_ratios"]] for r in rows},
    }
    return figures


def _median_by(items: list[dict], key: str) -> dict:
    """The item whose `key` is the median (the lower middle one for an even count)."""
    return sorted(items, key=lambda x: x[key])[(len(items) - 1) // 2]


if __name__ == "__main__":
    main()
