"""Cross-tokenizer quality (issue #18): SmolLM2-135M-Instruct's cache distilled into a student with another tokenizer.

One cache of the demo corpus (kdcache/demo.py `stdlib_corpus`) built by the real builder (`--teacher default`,
top-k 64, `--byte-offsets`, a held-out split). One student design (benchmarks/xtok_student.py): a byte-level BPE trained
with `tokenizers` on the corpus, once, and a small random Llama over it, initialised per seed. Rows, each trained by
`student_trainer.train.train`, what users run:

    ce_only     CE on the student's own next token only (alpha = 1)
    uld         alpha * CE + (1 - alpha) * ULD at the positions paired with a teacher position
    byte_align  alpha * CE + (1 - alpha) * (KL on the tokens both vocabularies hold + ULD on the rest)

Within a seed every row gets the same student initialisation, the same batches in the same order (the loader's order
depends on the seed and the cache only), the same steps and lr schedule: equal tokens. Metric: held-out bits per byte
(`student_trainer.evaluate`), which counts the same text whatever the tokenizer; the teacher's own is shown beside.

Run from the repository root:  .venv/bin/python benchmarks/quality_xtok.py [--steps N] [--seeds 0,1,2] [--write-results]
The last stdout line is one JSON object: xtok_bpb (method -> mean), xtok_beats_ce (byte_align below CE only in every
seed), and the rest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: the repo root

from benchmarks.xtok_student import make_bpe_student, train_bpe_tokenizer  # noqa: E402

METHODS = {"ce_only": ("CE only", "uld", True), "uld": ("ULD", "uld", False),
           "byte_align": ("byte_align (KL on shared tokens + ULD)", "byte_align", False)}  # label, kd_kind, CE only


@dataclass
class XtokQualitySettings:
    out: str = "/tmp/kdcache_quality_xtok"  # work folder: corpus, cache, tokenizer, runs (a complete cache is reused)
    corpus_chars: int = 80_000  # standard-library text (about 24k teacher tokens)
    heldout: float = 0.2
    seq_len: int = 128  # teacher tokens per cached sequence
    top_k: int = 64
    vocab: int = 4096  # the student's BPE entries
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    steps: int = 200
    batch_size: int = 8
    lr: float = 2e-3
    warmup_steps: int = 10
    alpha: float = 0.5  # CE weight of the uld and byte_align rows
    temperature: float = 1.0
    eval_batches: int = 0  # held-out batches of 8 sequences per student (0: the whole split)
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = tuple(METHODS)

    def row_key(self) -> dict:
        """What a row's result depends on besides method and seed: a stored result is reused only if it matches."""
        return {k: v for k, v in asdict(self).items() if k not in ("out", "seeds", "methods")}


def build_cache(s: XtokQualitySettings) -> tuple[str, Path]:
    """The cache (built once) and the corpus folder."""
    from formats.errors import CacheError
    from formats.reader import open_cache
    from kdcache.demo import stdlib_corpus

    out = Path(s.out)
    cache, corpus = out / "cache", out / "corpus"
    try:
        ready = open_cache(cache).manifest.complete
    except CacheError:
        ready = False
    if not ready:
        stdlib_corpus(corpus, s.corpus_chars, (1_000, 10_000))
        args = ["build", "--teacher", "default", "--corpus", str(corpus), "--out", str(cache), "--backend", "hf",
                "--top-k", str(s.top_k), "--seq-len", str(s.seq_len), "--heldout-fraction", str(s.heldout),
                "--shard-tokens", "16384", "--max-batch-tokens", "2048", "--byte-offsets", "--no-progress"]
        print("$ kdcache " + " ".join(args), file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "kdcache.cli", *args], check=True)
        (out / "build.json").write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    return str(cache), corpus


def student_tokenizer(s: XtokQualitySettings, corpus: Path):
    """The BPE, trained once on the corpus files and kept (every seed and row uses the same one)."""
    from transformers import AutoTokenizer

    folder = Path(s.out) / f"tokenizer-{s.vocab}"
    if not (folder / "tokenizer.json").exists():
        texts = [p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.txt"))]
        train_bpe_tokenizer(texts, s.vocab).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def run_row(s: XtokQualitySettings, name: str, cache: str, tokenizer, seed: int) -> dict:
    from student_trainer.evaluate import evaluate
    from student_trainer.settings import TrainSettings
    from student_trainer.train import train

    out = Path(s.out) / "runs" / f"{name}-seed{seed}"
    done = out / "result.json"
    if done.exists():
        stored = json.loads(done.read_text())
        if stored.get("settings") == json.loads(json.dumps(s.row_key())):
            print(f"{name} seed {seed}: reusing {done}", file=sys.stderr, flush=True)
            return stored["result"]
    shutil.rmtree(out, ignore_errors=True)
    student = make_bpe_student(out / "init", tokenizer, s.layers, s.hidden, s.heads, seed)
    _, kind, ce_only = METHODS[name]
    ts = TrainSettings(cache=cache, out=str(out / "run"), student=str(student), steps=s.steps, batch_size=s.batch_size,
                       lr=s.lr, warmup_steps=s.warmup_steps, kd_kind=kind, alpha=1.0 if ce_only else s.alpha,
                       temperature=s.temperature, num_workers=0, checkpoint_every=0, seed=seed, device="cpu",
                       progress=False)
    ts.validate()
    r = train(ts)
    t0 = time.perf_counter()
    e = evaluate(str(out / "run" / "final"), cache, "heldout", device="cpu", max_batches=s.eval_batches)
    lines = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    result = {"bpb": e["bpb"], "ce": e["ce"], "positions": e["positions"], "aligned_fraction": e["aligned_fraction"],
              "train_aligned_fraction": statistics.fmean(m["aligned_fraction"] for m in lines),
              "tokens": r["tokens"], "train_seconds": r["seconds"], "eval_seconds": time.perf_counter() - t0}
    shutil.rmtree(out / "run" / "final", ignore_errors=True)
    shutil.rmtree(out / "init", ignore_errors=True)
    done.write_text(json.dumps({"settings": s.row_key(), "result": result}, indent=1))
    print(f"{name} seed {seed}: held-out bpb {result['bpb']:.4f}, {r['tokens']} student tokens, "
          f"train {r['seconds']:.0f} s", file=sys.stderr, flush=True)
    return result


def teacher_bpb(s: XtokQualitySettings, cache: str) -> dict:
    """The teacher evaluated as a student on the same held-out split: the bits per byte a perfect student reaches."""
    from formats.reader import open_cache
    from student_trainer.evaluate import evaluate

    path = Path(s.out) / "teacher_eval.json"
    if path.exists():
        return json.loads(path.read_text())
    e = evaluate(open_cache(cache).manifest.teacher["path"], cache, "heldout", device="cpu", max_batches=s.eval_batches)
    path.write_text(json.dumps(e))
    return e


def processor() -> str:
    """`lscpu`'s model name (the first "model name" of /proc/cpuinfo), else the platform's word."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summarize(runs: dict[str, dict[int, dict]]) -> dict:
    out = {}
    for name, per_seed in runs.items():
        row = {}
        for key in ("bpb", "ce", "aligned_fraction", "train_aligned_fraction", "train_seconds", "tokens", "positions"):
            vals = [r[key] for r in per_seed.values()]
            row[key] = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals)}
        row["per_seed"] = {seed: r["bpb"] for seed, r in sorted(per_seed.items())}
        out[name] = row
    return out


def markdown(table: dict, s: XtokQualitySettings, command: str, build: dict, teacher: dict, seconds: float) -> str:
    first = next(iter(table.values()))
    evaluated = f"the first {s.eval_batches} batches of 8 sequences" if s.eval_batches else "the whole held-out split"
    lines = [
        f"Command (repository root): `{command}`\n",
        f"Processor: {processor()} (2 cores, shared with other jobs while it ran: timings are indicative only). "
        f"Cache build {build['seconds']:.0f} s; training and evaluation summed over the rows {seconds / 60:.1f} min "
        "(rows kept from an earlier invocation with the same settings count with their own time).\n",
        f"Teacher SmolLM2-135M-Instruct (`--teacher default`), cache of the demo corpus ({build['train_tokens']} train, "
        f"{build['heldout_tokens']} held-out teacher tokens), top-k {s.top_k}, `--byte-offsets`, {s.seq_len}-token "
        f"windows. Student: byte-level BPE of {s.vocab} entries trained with `tokenizers` on the corpus files, Llama "
        f"{s.layers} layers x {s.hidden} ({s.heads} heads), random init per seed. Each run: {s.steps} steps x "
        f"{s.batch_size} sequences (~{first['tokens']['mean']:.0f} student tokens), AdamW lr {s.lr} "
        f"({s.warmup_steps} warmup steps, cosine), temperature {s.temperature}, alpha {s.alpha} for the uld and "
        f"byte_align rows (1 for CE only), seeds {', '.join(map(str, s.seeds))}. Held-out bits per byte over "
        f"{evaluated} ({first['positions']['mean']:.0f} student positions); the teacher itself: "
        f"{teacher['bpb']:.3f} bits per byte. Values: mean [min, max] over seeds.\n",
        "| method | held-out bits per byte | per seed | CE per student token | paired positions (held-out) | train s/run |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        seeds = ", ".join(f"{v:.3f}" for v in row["per_seed"].values())
        lines.append(f"| {METHODS[name][0]} | {row['bpb']['mean']:.3f} [{row['bpb']['min']:.3f}, {row['bpb']['max']:.3f}] "
                     f"| {seeds} | {row['ce']['mean']:.3f} | {row['aligned_fraction']['mean']:.3f} "
                     f"| {row['train_seconds']['mean']:.0f} |")
    if "ce_only" in table and "byte_align" in table:
        ce, ba = table["ce_only"]["per_seed"], table["byte_align"]["per_seed"]
        wins = [seed for seed in ce if seed in ba and ba[seed] < ce[seed]]
        lines += ["", f"byte_align below CE only in {len(wins)} of {len(ce)} seeds "
                      f"(per-seed differences: {', '.join(f'{ba[k] - ce[k]:+.3f}' for k in ce if k in ba)} bits per byte)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = XtokQualitySettings()
    for name in ("out", "corpus_chars", "vocab", "layers", "hidden", "heads", "steps", "batch_size", "lr",
                 "warmup_steps", "alpha", "temperature", "eval_batches"):
        p.add_argument("--" + name.replace("_", "-"), type=type(getattr(d, name)), default=getattr(d, name))
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)), help="comma-separated")
    p.add_argument("--methods", default=",".join(d.methods), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 runs faster on "
                   "a CPU other jobs share, where a thread pool waits for its descheduled threads")
    p.add_argument("--write-results", action="store_true", help="write the table into benchmarks/RESULTS.md")
    a = vars(p.parse_args(argv))
    write, threads = a.pop("write_results"), a.pop("threads")
    if threads:
        import torch

        torch.set_num_threads(threads)
    s = XtokQualitySettings(**{**a, "seeds": tuple(int(x) for x in a["seeds"].split(",")),
                               "methods": tuple(a["methods"].split(","))})
    unknown = [m for m in s.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")

    t0 = time.perf_counter()
    cache, corpus = build_cache(s)
    from formats.reader import open_cache

    splits = open_cache(cache).manifest.splits()
    build_file = Path(s.out) / "build.json"
    build = {"train_tokens": splits["train"]["tokens"], "heldout_tokens": splits["heldout"]["tokens"],
             "seconds": json.loads(build_file.read_text())["seconds"] if build_file.exists() else float("nan")}
    tokenizer = student_tokenizer(s, corpus)
    runs: dict[str, dict[int, dict]] = {m: {} for m in s.methods}
    for seed in s.seeds:  # seed-major: a cut-short run still has whole seeds
        for name in s.methods:
            runs[name][seed] = run_row(s, name, cache, tokenizer, seed)
    teacher = teacher_bpb(s, cache)
    table = summarize(runs)
    row_seconds = sum(r["train_seconds"] + r["eval_seconds"] for per_seed in runs.values() for r in per_seed.values())
    command = "python benchmarks/quality_xtok.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(table, s, command.strip(), build, teacher, row_seconds)
    print(text)
    if write:
        from benchmarks.results import update_results

        update_results("Cross-tokenizer quality", text)
    bpb = {name: row["bpb"]["mean"] for name, row in table.items()}
    ce_seeds, ba_seeds = table.get("ce_only", {}).get("per_seed", {}), table.get("byte_align", {}).get("per_seed", {})
    summary = {
        "xtok_bpb": bpb,
        # byte_align below CE only in every seed (equal tokens, same initialisation per seed).
        "xtok_beats_ce": bool(ce_seeds) and set(ce_seeds) == set(ba_seeds) and all(ba_seeds[k] < ce_seeds[k] for k in ce_seeds),
        "per_seed_bpb": {name: row["per_seed"] for name, row in table.items()},
        "teacher_bpb": teacher["bpb"],
        "aligned_fraction": {name: row["aligned_fraction"]["mean"] for name, row in table.items()},
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()},
        "row_seconds": round(row_seconds, 1),
        "invocation_seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
