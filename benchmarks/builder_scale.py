"""Builder at scale (issue #14): builder memory against corpus size, and Ray replicas against a local build.

    python benchmarks/builder_scale.py [--tokens 25000] [--rounds 3] [--no-results]

(a) Peak RSS (VmHWM) of a local build over synthetic corpora of N and 8N tokens, each in a fresh process: the
    streaming builder holds a few shard groups, not the corpus, so the ratio should stay near 1.
(b) Build tok/s of a local one-thread build, and of Ray builds with 1 and 2 replicas of one thread each (a
    two-CPU cluster on 127.0.0.1, started once), over the same corpus, in interleaved rounds (medians). The
    rate is the steady one, from the first shard written to the last (file times): start-up (a replica
    importing torch and loading the teacher) is reported apart, as it does not grow with the corpus.
    The same shard groups also go through Ray Data (`map_batches` over an actor pool of 2 replicas), the
    alternative to the Ray Core actors the builder uses.
(c) The capacity plan is text in RESULTS.md, from (b) and published vLLM figures.

Writes its section of benchmarks/RESULTS.md; the last line printed is JSON with `rss_ratio_8x`,
`ray_scaling_efficiency` (2 replicas / (2 x 1 replica)) and `ray_overhead` (1 replica / local).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from results import processor, update_subsection  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray on loopback only (its address resolution otherwise prefers the machine's network address), no usage reports.
os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")

# Small batches keep the teacher's own memory (its fp32 logits, max_batch_tokens x vocab) from hiding the corpus's.
BUILD = dict(top_k=8, seq_len=512, max_batch_tokens=1024, shard_tokens=2048, progress=False)


def synthetic_corpus(folder: Path, tokens: int) -> Path:
    """Files of random stdlib words: about `tokens` SmolLM2 tokens (2 tokens per word, measured)."""
    folder.mkdir(parents=True, exist_ok=True)
    words = (Path(os.__file__).parent / "textwrap.py").read_text(encoding="utf-8").split()
    rng = random.Random(0)
    per_file = 3000  # words
    for i in range(max(1, round(tokens / 2.0 / per_file))):
        (folder / f"doc-{i:05d}.txt").write_text(" ".join(rng.choice(words) for _ in range(per_file)), encoding="utf-8")
    return folder


def rss_child(teacher: str, corpus: str, out: str) -> None:
    """In a fresh process: one local build, then its peak resident memory."""
    from cache_builder.build import run_build
    from cache_builder.settings import BuildSettings

    man = run_build(BuildSettings(teacher=teacher, corpus=[corpus], out=out, **BUILD))
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    print(json.dumps({"vmhwm_kib": int(hwm.split()[1]), "tokens": man.totals()["tokens"]}))


def peak_rss(teacher: Path, corpus: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--rss-child", str(teacher), str(corpus), str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the RSS build over {corpus} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def steady(out: Path, shards: list[tuple[str, int]], t0: float) -> dict:
    """Start-up (to the first shard written) and the steady rate after it, from when each shard's file was
    renamed into place: the time a replica finished it, whatever order the driver publishes in."""
    done = sorted(((out / path).stat().st_mtime, tokens) for path, tokens in shards)
    return {"startup_s": done[0][0] - t0, "steady_tok_s": sum(t for _, t in done[1:]) / (done[-1][0] - done[0][0]),
            "tokens": sum(t for _, t in done)}


def timed_build(settings) -> dict:
    from cache_builder.build import run_build

    t0 = time.time()
    man = run_build(settings)
    return steady(Path(settings.out), [(sh.path, sh.tokens) for sh in man.shards], t0)


def executor_rates(teacher: Path, corpus: Path, tmp: Path, rounds: int) -> dict[str, float]:
    """The same shard groups (tokenized beforehand) through 2 one-thread replicas as Ray Core actors (what the
    builder uses) and as Ray Data `map_batches` over an actor pool, in interleaved rounds: median steady tok/s."""
    from transformers import AutoTokenizer

    from cache_builder.capture import CaptureSettings
    from cache_builder.corpus import tokenize_corpus
    from cache_builder.documents import CorpusOptions
    from cache_builder.groups import shard_groups
    from cache_builder.records import RecordSpec
    from cache_builder.settings import BuildSettings
    from formats.schema import make_fields

    s = BuildSettings(teacher=str(teacher), corpus=[str(corpus)], out="", device="cpu", ray="local", ray_replicas=2,
                      **BUILD)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    groups = list(shard_groups(tokenize_corpus(CorpusOptions(paths=[str(corpus)], seq_len=s.seq_len), tokenizer),
                               s.shard_tokens))
    spec = RecordSpec(CaptureSettings(top_k=s.top_k, vocab_size=len(tokenizer)), [], "BF16", make_fields(s.top_k, "F32"),
                      s.max_batch_tokens, s.seed)
    make = _TeacherFactory(str(teacher), s)
    rates: dict[str, list[float]] = {"core": [], "data": []}
    for r in range(rounds):
        for kind in (("core", "data") if r % 2 == 0 else ("data", "core")):
            out = tmp / f"exec-{kind}-{r}"
            (out / "shards").mkdir(parents=True)
            run = _ray_core if kind == "core" else _ray_data
            t0 = time.time()
            rates[kind].append(steady(out, run(make, spec, dataclasses.replace(s, out=str(out)), groups),
                                      t0)["steady_tok_s"])
            print(f"(b) round {r} executor {kind}: {rates[kind][-1]:.0f} tok/s steady")
    return {k: statistics.median(v) for k, v in rates.items()}


def driver_rate(teacher: Path, corpus: Path) -> float:
    """Tokens/s of what a build's driver does for every token on its own: read, tokenize, pack and cut into shard
    groups (one process; the teacher replicas are elsewhere). A Ray build cannot outrun it."""
    from transformers import AutoTokenizer

    from cache_builder.corpus import tokenize_corpus
    from cache_builder.documents import CorpusOptions
    from cache_builder.groups import shard_groups

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    t0 = time.perf_counter()
    tokens = sum(g.tokens for g in shard_groups(tokenize_corpus(
        CorpusOptions(paths=[str(corpus)], seq_len=BUILD["seq_len"]), tokenizer), BUILD["shard_tokens"]))
    return tokens / (time.perf_counter() - t0)


# Capacity plan inputs. Prefill is compute-bound: tokens/s per GPU = MFU x peak / FLOPs per token (2 x parameters).
H100_BF16_FLOPS = 989e12  # NVIDIA H100 SXM datasheet, dense BF16 tensor core
PREFILL_MFU = 0.4  # assumed share of peak a large-batch vLLM prefill reaches; an assumption, not a measurement
# Published vLLM rates for the same models on H100s: generation (decode-heavy) workloads, the only vLLM figures found;
# a prefill-only build runs faster per token, so these bound the plan from below.
PUBLISHED = {
    "8B": ("Llama-3.1-8B FP8, 8x H100 SXM, vLLM 0.5.4: 3,932 output tok/s per 8 GPUs (Lambda, "
           "github.com/LambdaLabsML/vllm-benchmark, benchmark_v0.md); Llama-3.1-8B FP8, 1x H100, vLLM 0.10.0: "
           "5,777 tok/s MLPerf Inference v5.1 Offline (Red Hat's submission)", 5777.0),
    "70B": ("Llama-3.1-70B FP8, 8x H100 SXM (TP 8), vLLM 0.5.4: 2,573 output tok/s (Lambda, same report)", 2573.0 / 8),
}
PLAN = {"8B": dict(params=8.0e9, gpus_per_replica=1), "70B": dict(params=70.6e9, gpus_per_replica=4)}
PLAN_TOKENS, PLAN_GPUS = 1e10, 64  # 10^10 tokens on 8 nodes x 8 GPUs


def capacity_plan(figures: dict, driver_tok_s: float) -> str:
    """Wall time for PLAN_TOKENS on PLAN_GPUS H100s, from the compute bound and from the published rates, each
    scaled by this run's Ray overhead (at most 1), and again where the driver's own rate is lower."""
    overhead = figures["ray_overhead"]
    rows = []
    for name, m in PLAN.items():
        bound = PREFILL_MFU * H100_BF16_FLOPS / (2 * m["params"])
        source, published = PUBLISHED[name]
        for label, per_gpu in (("compute bound", bound), ("published generation rate", published)):
            rate = PLAN_GPUS * per_gpu * min(overhead, 1.0)
            rows.append(f"| {name} | {PLAN_GPUS // m['gpus_per_replica']} x TP {m['gpus_per_replica']} | {label} | "
                        f"{per_gpu:,.0f} | {rate / 1e6:.2f} M | {PLAN_TOKENS / rate / 3600:.1f} h | "
                        f"{PLAN_TOKENS / min(rate, driver_tok_s) / 3600:.1f} h |")
    return f"""Capacity plan: 10^10 tokens, 8 nodes x 8 H100 SXM (64 GPUs), one `kdcache build --ray auto` driver. Per
GPU, two figures: the compute bound of a prefill ({PREFILL_MFU:.0%} of {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s dense BF16,
an assumed utilization; 2 x parameters FLOPs per token, the LM head over every position included) and published
vLLM rates, which are generation rates (the only vLLM figures found for these models: {PUBLISHED['8B'][0]};
{PUBLISHED['70B'][0]}), so a floor for a prefill-only build. Both are multiplied by this run's Ray overhead
({overhead:.2f}; a figure above 1 counts as 1). This run's scaling efficiency ({figures['ray_scaling_efficiency']:.2f}) is
not applied: it measures two one-thread replicas sharing two cores with the driver (tokenizer thread, publishing)
and Ray's own processes; on GPU nodes each replica has its GPU and its CPU share.

| teacher | replicas | per-GPU rate from | tok/s per GPU | cluster tok/s | 10^10 tokens | with this driver |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

The 70B teacher is 141 GB in BF16: 4 GPUs per replica (`--vllm-tensor-parallel-size 4`), 16 replicas. The last
column caps the cluster at the driver's rate: the driver reads, tokenizes and cuts the whole corpus in one process,
measured here at {driver_tok_s:,.0f} tok/s (SmolLM2 tokenizer, this CPU, loaded). With an 8B teacher the driver, not
the GPUs, sets the pace; `--num-parts` does not lift it (each part tokenizes the whole corpus to find its shard
groups); a faster driver CPU or pre-tokenized `input_ids` records would (not measured). The shared filesystem takes
the cluster rate x bytes per token (356 B/token for plain top-64, 97 for compact: `benchmarks/RESULTS.md`,
'Quality: compact top-k (issue 17)').
"""


def _path(group) -> str:
    return f"shards/{group.split}-{group.index:05d}.parquet"


def _ray_core(make, spec, s, groups) -> list[tuple[str, int]]:
    from cache_builder.ray_build import RayReplicas
    from cache_builder.replicas import ShardWork

    replicas = RayReplicas(make, spec, s, progress=lambda n: None)
    done = []
    try:
        for g in groups:
            done += replicas.submit(ShardWork(g, g.index, _path(g)))
        done += replicas.drain()
    finally:
        replicas.close()
    return [(e.path, e.tokens) for _, e in done]


def _ray_data(make, spec, s, groups) -> list[tuple[str, int]]:
    import logging

    import ray.data

    from cache_builder.ray_build import TeacherReplica

    class Stage:
        def __init__(self):
            self.replica = TeacherReplica(make, spec, s.out, "parquet", 1)

        def __call__(self, batch):
            entries = [self.replica.run(pickle.loads(raw), str(path)) for raw, path in zip(batch["group"], batch["path"])]
            return {"path": [e.path for e in entries], "tokens": [e.tokens for e in entries]}

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    items = [{"group": pickle.dumps(g), "path": _path(g)} for g in groups]
    ds = ray.data.from_items(items).map_batches(Stage, batch_size=1, compute=ray.data.ActorPoolStrategy(size=2),
                                                num_cpus=1, max_concurrency=2)
    return [(str(row["path"]), int(row["tokens"])) for row in ds.iter_rows()]


class _TeacherFactory:
    """A picklable `make_teacher` for the Ray Data replicas."""

    def __init__(self, path: str, s):
        self.path, self.s = path, s

    def __call__(self):
        from cache_builder.build import open_teacher

        return open_teacher(self.path, Path(self.path).name, self.s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=25000, help="N: tokens of the small corpus; (b) uses N as well")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of (b)")
    ap.add_argument("--no-results", action="store_true", help="do not rewrite benchmarks/RESULTS.md")
    ap.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child)
        return

    import ray
    import torch

    from cache_builder.default_teacher import default_teacher_dir
    from cache_builder.settings import BuildSettings
    from tests.cache_builder.tiny_teacher import make_tiny_teacher

    tmp = Path(tempfile.mkdtemp(prefix="kdcache-scale-"))
    try:
        teacher = make_tiny_teacher(tmp / "teacher", default_teacher_dir())
        small, large = synthetic_corpus(tmp / "n", args.tokens), synthetic_corpus(tmp / "8n", 8 * args.tokens)
        load_before = os.getloadavg()[0]

        # (a) memory: each corpus in a fresh process.
        rss = {name: peak_rss(teacher, corpus, tmp / f"rss-{name}") for name, corpus in (("N", small), ("8N", large))}
        rss_ratio = rss["8N"]["vmhwm_kib"] / rss["N"]["vmhwm_kib"]
        print(f"(a) peak RSS: N = {rss['N']['tokens']} tokens {rss['N']['vmhwm_kib'] / 1024:.0f} MiB, "
              f"8N = {rss['8N']['tokens']} tokens {rss['8N']['vmhwm_kib'] / 1024:.0f} MiB, ratio {rss_ratio:.3f}")

        # (b) throughput: one thread per teacher; a two-CPU Ray cluster on loopback for the whole run.
        torch.set_num_threads(1)
        os.environ["RAY_TMPDIR"] = str(tmp / "ray")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        runs: dict[str, list[dict]] = {"local": [], "ray-1": [], "ray-2": []}
        kinds = {"local": {}, "ray-1": dict(ray="local", ray_replicas=1), "ray-2": dict(ray="local", ray_replicas=2)}
        for r in range(args.rounds):
            order = list(kinds) if r % 2 == 0 else list(reversed(kinds))
            for name in order:
                out = tmp / f"b-{name}-{r}"
                runs[name].append(timed_build(BuildSettings(teacher=str(teacher), corpus=[str(small)], out=str(out),
                                                            device="cpu", **kinds[name], **BUILD)))
                print(f"(b) round {r} {name}: {runs[name][-1]['steady_tok_s']:.0f} tok/s steady, start-up "
                      f"{runs[name][-1]['startup_s']:.1f} s")
        executors = executor_rates(teacher, small, tmp, args.rounds)
        driver = driver_rate(teacher, large)
        print(f"(c) driver: read, tokenize and group {driver:.0f} tok/s")
        ray.shutdown()
        load_after = os.getloadavg()[0]
        med = {k: statistics.median(x["steady_tok_s"] for x in v) for k, v in runs.items()}
        startup = {k: statistics.median(x["startup_s"] for x in v) for k, v in runs.items()}
        efficiency = med["ray-2"] / (2 * med["ray-1"])
        overhead = med["ray-1"] / med["local"]
        print(f"(b) medians: local {med['local']:.0f}, Ray 1 replica {med['ray-1']:.0f}, 2 replicas "
              f"{med['ray-2']:.0f} tok/s; the same groups through 2 replicas: Ray Core {executors['core']:.0f}, "
              f"Ray Data {executors['data']:.0f} tok/s; scaling efficiency "
              f"{efficiency:.3f}, Ray overhead {overhead:.3f}; load average {load_before:.1f} -> {load_after:.1f}")
        figures = {"rss_ratio_8x": round(rss_ratio, 3), "ray_scaling_efficiency": round(efficiency, 3),
                   "ray_overhead": round(overhead, 3)}
        if not args.no_results:
            write_results(args, rss, med, startup, executors, figures, (load_before, load_after), driver)
        print(json.dumps(figures))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_results(args, rss, med, startup, executors, figures, load, driver: float) -> None:
    import torch

    cmd = "python benchmarks/builder_scale.py " + " ".join(sys.argv[1:])
    rows = [("peak RSS, N tokens", f"{rss['N']['vmhwm_kib'] / 1024:.0f} MiB ({rss['N']['tokens']} tokens)"),
            ("peak RSS, 8N tokens", f"{rss['8N']['vmhwm_kib'] / 1024:.0f} MiB ({rss['8N']['tokens']} tokens)"),
            ("rss_ratio_8x", figures["rss_ratio_8x"]),
            ("local build, 1 thread", f"{med['local']:.0f} tok/s (start-up {startup['local']:.1f} s)"),
            ("Ray, 1 replica x 1 thread", f"{med['ray-1']:.0f} tok/s (start-up {startup['ray-1']:.1f} s)"),
            ("Ray, 2 replicas x 1 thread", f"{med['ray-2']:.0f} tok/s (start-up {startup['ray-2']:.1f} s)"),
            ("same groups, 2 replicas: Ray Core actors", f"{executors['core']:.0f} tok/s"),
            ("same groups, 2 replicas: Ray Data map_batches", f"{executors['data']:.0f} tok/s"),
            ("ray_scaling_efficiency", figures["ray_scaling_efficiency"]),
            ("ray_overhead", figures["ray_overhead"])]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    update_subsection("Builder at scale", f"""### {processor()}

Command: `{cmd.strip()}`  
Machine: {processor()}, {platform.machine()}, torch {torch.__version__}, ray {_ray_version()}; load
average {load[0]:.1f} before and {load[1]:.1f} after (where it is well above the two cores, other jobs shared them:
then the rates are lower bounds, and the ratios are what to read).

| figure | value |
|---|---|
{table}

Rates are steady ones (first shard written to last, medians of {args.rounds} interleaved rounds); start-up (to the
first shard) is apart. Tiny teacher (2 layers, hidden 128, SmolLM2 vocabulary), top-k 8, seq-len 512, batches of
1024 and shards of 2048 tokens, synthetic text.

{capacity_plan(figures, driver)}""")


def _ray_version() -> str:
    import ray

    return ray.__version__


if __name__ == "__main__":
    main()
