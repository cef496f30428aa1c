"""Reading a cache from an object store against reading it locally: loader tokens per second.

    python benchmarks/remote.py [--tokens 1000000] [--repeats 3] [--workers 1] [--batch-size 8] [--no-results]

One cache (benchmarks/loader_caches.py, "plain": top-k 64 BF16, Parquet) is written locally and copied with
`kdcache copy` into a bucket of moto's S3 server, run as its own process on 127.0.0.1 (so its work does not share
the loader's interpreter). Measured, interleaved `--repeats` times (the machine is shared; figures are medians):
- local: one epoch of `EpochReader.batches` over the local cache, every batch touched;
- remote cold: the same epoch over s3://, the shard cache emptied first, so every shard is downloaded (whole,
  sha256-checked) during the epoch: a first run on a new machine;
- remote warm: the same epoch again with the shard cache filled by the cold one: a second epoch or a later run.
Each figure is the epoch's tokens over its wall time, start-up (opening the cache, the loader's order, worker
start) included, the same for all three. `demo_consumption` (benchmarks/loader.py) gives the tokens per second the
demo student trains on here. The last line printed is JSON with `remote_cold_over_local`, `remote_warm_over_local`
and `cold_over_demo_consumption`, plus every figure. Writes its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loader import demo_consumption, touch  # noqa: E402
from loader_caches import write_cache  # noqa: E402
from results import processor, update_results  # noqa: E402

from formats.copy import copy_cache  # noqa: E402
from formats.shard_cache import DIR_ENV  # noqa: E402
from formats.store import OPTIONS_ENV  # noqa: E402
from student_trainer.loader import EpochReader, LoaderSettings  # noqa: E402

SECTION = "Remote caches: S3 (loopback) against local"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url, timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto's server did not start")


def epoch(url: str, workers: int, batch_size: int) -> dict:
    """Tokens per second of one whole epoch, start-up included."""
    t0 = time.perf_counter()
    reader = EpochReader(url, "train", LoaderSettings(batch_size=batch_size, num_workers=workers, prefetch=4))
    tokens = 0
    for b in reader.batches(epoch=0):
        touch(b)
        tokens += b.num_tokens
        del b
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--demo-steps", type=int, default=3)
    ap.add_argument("--no-results", action="store_true")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kdcache-remote-bench-"))
    moto, endpoint = start_moto()
    try:
        local = write_cache(tmp / "local", "parquet", "plain", args.tokens)
        os.environ[OPTIONS_ENV] = json.dumps({"endpoint_url": endpoint, "key": "bench", "secret": "bench"})
        import s3fs

        s3fs.S3FileSystem(endpoint_url=endpoint, key="bench", secret="bench").mkdir("kdcache-bench")
        remote = "s3://kdcache-bench/cache"
        copy_cache(local, remote)
        shard_cache = tmp / "shard-cache"
        os.environ[DIR_ENV] = str(shard_cache)
        runs: dict[str, list[dict]] = {"local": [], "cold": [], "warm": []}
        for r in range(args.repeats):
            runs["local"].append(epoch(local, args.workers, args.batch_size))
            shutil.rmtree(shard_cache, ignore_errors=True)
            runs["cold"].append(epoch(remote, args.workers, args.batch_size))
            runs["warm"].append(epoch(remote, args.workers, args.batch_size))
            print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]['tok_s']:.0f} tok/s" for k, v in runs.items()), flush=True)
    finally:
        moto.terminate()
        moto.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: float(np.median([x["tok_s"] for x in v])) for k, v in runs.items()}
    demo = demo_consumption(args.demo_steps)
    figures = {
        "remote_cold_over_local": round(med["cold"] / med["local"], 3),
        "remote_warm_over_local": round(med["warm"] / med["local"], 3),
        "cold_over_demo_consumption": round(med["cold"] / demo["tok_s"], 1),
        "local_tok_s": round(med["local"]), "remote_cold_tok_s": round(med["cold"]),
        "remote_warm_tok_s": round(med["warm"]), "demo_tok_s": round(demo["tok_s"]),
        "tokens": runs["local"][0]["tokens"], "repeats": args.repeats, "workers": args.workers,
    }
    if not args.no_results:
        cmd = "python benchmarks/remote.py " + " ".join(sys.argv[1:])
        body = (f"Command: `{cmd.strip()}`  \nMachine: {processor()}, shared with other agents' work while measured "
                "(figures are medians of interleaved runs; the lead re-runs them at the end).\n\n"
                "| reader | tok/s (median) | over local |\n|---|---|---|\n"
                f"| local cache | {med['local']:.0f} | 1 |\n"
                f"| S3 (moto on loopback), cold shard cache | {med['cold']:.0f} | {figures['remote_cold_over_local']} |\n"
                f"| S3, warm shard cache | {med['warm']:.0f} | {figures['remote_warm_over_local']} |\n\n"
                f"One epoch of {figures['tokens']} tokens (plain top-64 BF16 Parquet, benchmarks/loader_caches.py), "
                f"{args.workers} loader worker(s), batch {args.batch_size}, start-up included. The demo student "
                f"consumes {demo['tok_s']:.0f} tok/s here: the cold read is {figures['cold_over_demo_consumption']}x "
                "that (goal >= 20x); warm over local goal >= 0.9.\n\n```json\n" + json.dumps(figures) + "\n```")
        update_results(SECTION, body)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
