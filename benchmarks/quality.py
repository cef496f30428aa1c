"""Quality benchmark (issue #6): how much of full-logit KD's gain each cached teacher representation keeps.

One teacher (the demo's, SmolLM2-135M-Instruct), one cache built once over standard-library source text by the real
builder with top-k 64 and 50 RS-KD draws, plus a held-out split. Smaller caches are derived from it exactly with
`kdcache convert --top-k K --drop-samples` (the first K of a sorted top-64 are the top-K; the dropped mass joins
the tail), so every row sees the same teacher distributions (top64_compact: its 6-bit codes of them). Rows:

    ce_only      CE on the real next token only (alpha = 1)
    top12        top-12, renormalised over the 12 ids (fkl_renorm): the plain top-k of the RS-KD paper
    top64        top-64, renormalised (fkl_renorm)
    top64_compact  the same top-64 stored compactly (6-bit codes, SPEC.md "Compact top-k"), the same loss: issue 17's
                 acceptance row, within the seed spread of top64
    top12_tail   top-12 plus a tail bucket (fkl_ghost, the paper's "ghost token")
    rskd50       RS-KD: 50 draws per position (kd_kind rskd)
    full_kd      full-logit forward KL with the teacher in memory (benchmarks/online_kd.py): the reference

Every row: the same student (layers derived from the teacher's), the same batches in the same order (the loader's
order is a function of the seed and the read blocks, which the derived caches share), the same steps, lr schedule
and seed. The offline rows run `student_trainer.train.train`, what users run; the online row reuses the trainer's
loader and lr schedule. Each student is evaluated on the held-out split with `student_trainer.evaluate.evaluate`.

    gap closed = (CE_ce_only - CE_method) / (CE_ce_only - CE_full_kd)      (per seed, then mean)

Run from the repository root:  .venv/bin/python benchmarks/quality.py [--steps N] [--seeds 0,1,2] [--write-results]
The last stdout line is one JSON object: heldout_ce (method -> mean), rskd_gap_closed, kd_beats_ce, and the rest.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: the repo root
from benchmarks.results import processor, update_results  # noqa: E402

# RS-KD paper (Anshumann et al., ACL 2025), 3B -> 300M, 10B tokens, held-out LM loss; mapped onto our rows (their
# top-50 onto our top-64, their ghost token onto top-12 + tail bucket).
PAPER_300M = {"ce_only": 2.81, "top12": 2.87, "top64": 2.80, "top12_tail": 2.77, "rskd50": 2.75, "full_kd": 2.75}


def compare_with_paper(table: dict) -> list[str]:
    """Each pairwise order the paper reports (a strictly below b), checked on our means; 'clear' when the seed
    ranges do not overlap."""
    lines = []
    names = [n for n in PAPER_300M if n in table]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pa, pb = PAPER_300M[a], PAPER_300M[b]
            if pa == pb:
                continue
            lo, hi = (a, b) if pa < pb else (b, a)
            ours_lo, ours_hi = table[lo]["ce"], table[hi]["ce"]
            holds = ours_lo["mean"] < ours_hi["mean"]
            clear = ours_lo["max"] < ours_hi["min"] if holds else ours_hi["max"] < ours_lo["min"]
            verdict = ("holds" if holds else "reversed") + (" (seed ranges apart)" if clear else " (seed ranges overlap)")
            lines.append(f"- paper: {METHODS[lo].label} {PAPER_300M[lo]:.2f} < {METHODS[hi].label} {PAPER_300M[hi]:.2f}; "
                         f"ours {ours_lo['mean']:.3f} vs {ours_hi['mean']:.3f}: {verdict}")
    return lines


@dataclass(frozen=True)
class Method:
    cache: str  # which cache the row trains on: "k12", "k64" (no samples), "rskd" (top-1 + samples), "" = online
    kd_kind: str = "fkl_ghost"
    alpha: float = 0.0  # 1.0: CE only
    label: str = ""


METHODS = {
    "ce_only": Method("k12", alpha=1.0, label="CE only"),
    "top12": Method("k12", "fkl_renorm", label="top-k 12 (renormalised)"),
    "top64": Method("k64", "fkl_renorm", label="top-k 64 (renormalised)"),
    "top64_compact": Method("k64c", "fkl_renorm", label="top-k 64 compact, 6-bit (renormalised)"),
    "top12_tail": Method("k12", "fkl_ghost", label="top-k 12 + tail bucket"),
    "rskd50": Method("rskd", "rskd", label="RS-KD, 50 draws"),
    "full_kd": Method("", label="full-logit KD (online)"),
}


@dataclass
class QualitySettings:
    out: str = "/tmp/kdcache_quality"  # work folder: corpus, caches, students (the built cache is reused if there)
    corpus_chars: int = 80_000  # standard-library text (about 24k tokens)
    heldout: float = 0.2  # fraction of documents held out
    seq_len: int = 128
    layers: int = 4  # student layers, copied from the teacher's
    steps: int = 20
    batch_size: int = 4
    lr: float = 1e-3
    warmup_steps: int = 3
    eval_batches: int = 4  # held-out batches of 8 sequences evaluated per student (0: the whole split)
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = tuple(METHODS)

    def row_key(self) -> dict:
        """What a row's result depends on besides method and seed: a stored result is reused only if it matches."""
        return {k: v for k, v in asdict(self).items() if k not in ("out", "seeds", "methods")}


def _kdcache(*args: str) -> None:
    print("$ kdcache " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "kdcache.cli", *args], check=True)


def build_caches(s: QualitySettings) -> dict[str, str]:
    """The built cache (top-64 + 50 draws) and the four derived from it; returns name -> path."""
    from formats.errors import CacheError
    from formats.reader import open_cache
    from kdcache.demo import stdlib_corpus

    out = Path(s.out)
    full = out / "cache"
    try:
        ready = open_cache(full).manifest.complete
    except CacheError:
        ready = False
    if not ready:
        corpus = stdlib_corpus(out / "corpus", s.corpus_chars, (1_000, 10_000))
        t0 = time.perf_counter()
        _kdcache("build", "--teacher", "default", "--corpus", str(corpus), "--out", str(full), "--backend", "hf",
                 "--top-k", "64", "--sample-draws", "50", "--seq-len", str(s.seq_len), "--heldout-fraction",
                 str(s.heldout), "--shard-tokens", "16384", "--max-batch-tokens", "2048")
        (out / "build.json").write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    caches = {"full": str(full)}
    for name, args in {"k64": ("--top-k", "64", "--drop-samples"), "k12": ("--top-k", "12", "--drop-samples"),
                       "rskd": ("--top-k", "1"),
                       "k64c": ("--top-k", "64", "--drop-samples", "--topk-encoding", "compact", "--logprob-bits", "6")
                       }.items():
        path = out / f"cache_{name}"
        try:
            ready = open_cache(path).manifest.complete
        except CacheError:
            ready = False
        if not ready:
            _kdcache("convert", str(full), "--out", str(path), "--overwrite", *args)
        caches[name] = str(path)
    shape = [(e.split, e.sequences, e.tokens) for e in open_cache(full).shards()]
    for name, path in caches.items():  # same shards -> same read blocks -> same batch order for every row
        assert [(e.split, e.sequences, e.tokens) for e in open_cache(path).shards()] == shape, name
    return caches


def bytes_per_token(cache: str) -> float:
    """File bytes of all shards / tokens, as written (Parquet, compressed)."""
    from formats.reader import open_cache

    totals = open_cache(cache).manifest.totals()
    return totals["bytes"] / totals["tokens"]


def train_offline(s: QualitySettings, method: Method, cache: str, seed: int, out: Path) -> dict:
    from student_trainer.train import train
    from student_trainer.settings import TrainSettings

    ts = TrainSettings(cache=cache, out=str(out), student_layers=s.layers, init_from_teacher="cache", steps=s.steps,
                       batch_size=s.batch_size, lr=s.lr, warmup_steps=s.warmup_steps, kd_kind=method.kd_kind,
                       alpha=method.alpha, num_workers=0, checkpoint_every=0, seed=seed, device="cpu", progress=False)
    ts.validate()
    r = train(ts)
    return {"tokens": r["tokens"], "train_seconds": r["seconds"], "final_loss": r["last"].get("loss")}


def train_online(s: QualitySettings, cache: str, seed: int, out: Path) -> dict:
    """Full-logit KD: the trainer's student, loader order and lr schedule, with the teacher in memory."""
    import torch

    from benchmarks.online_kd import load_teacher, online_step
    from formats.reader import open_cache
    from student_trainer.loader import EpochReader, LoaderSettings
    from student_trainer.student import student_from_teacher
    from student_trainer.schedule import lr_factor
    from student_trainer.settings import TrainSettings

    m = open_cache(cache).manifest
    ts = TrainSettings(cache=cache, out=str(out), student_layers=s.layers, init_from_teacher=m.teacher["path"],
                       steps=s.steps, batch_size=s.batch_size, lr=s.lr, warmup_steps=s.warmup_steps, seed=seed)
    torch.manual_seed(seed)  # as train() does before building the student
    student, tokenizer, _ = student_from_teacher(m.teacher["path"], s.layers, seed=seed)
    teacher = load_teacher(m.teacher["path"], "cpu")
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=s.lr, betas=ts.betas,
                                  weight_decay=ts.weight_decay)
    reader = EpochReader(cache, "train", LoaderSettings(batch_size=s.batch_size, shuffle_blocks=ts.shuffle_blocks,
                                                        seed=seed, num_workers=0))
    epoch, batches, tokens, t0, last = 0, reader.batches(0), 0, time.perf_counter(), {}
    student.train()
    for step in range(s.steps):
        for g in optimizer.param_groups:
            g["lr"] = s.lr * lr_factor(step, ts.steps, ts.warmup_steps, ts.min_lr_ratio)
        try:
            batch = next(batches)
        except StopIteration:
            epoch += 1
            batches = reader.batches(epoch)
            batch = next(batches)
        last = online_step(student, teacher, batch, optimizer, grad_clip=ts.grad_clip, vocab_size=m.vocab_size)
        tokens += last["tokens"]
    seconds = time.perf_counter() - t0
    student.save_pretrained(out / "final", safe_serialization=True)
    tokenizer.save_pretrained(out / "final")
    return {"tokens": tokens, "train_seconds": seconds, "final_loss": last.get("loss")}


def run_row(s: QualitySettings, name: str, caches: dict[str, str], seed: int) -> dict:
    from student_trainer.evaluate import evaluate

    method = METHODS[name]
    out = Path(s.out) / "runs" / f"{name}-seed{seed}"
    done = out / "result.json"
    if done.exists():  # rows are independent: a later invocation with more seeds reuses the finished ones
        stored = json.loads(done.read_text())
        if stored.get("settings") == json.loads(json.dumps(s.row_key())):
            print(f"{name} seed {seed}: reusing {done}", file=sys.stderr, flush=True)
            return stored["result"]
    shutil.rmtree(out, ignore_errors=True)
    if method.cache:
        r = train_offline(s, method, caches[method.cache], seed, out)
    else:
        r = train_online(s, caches["full"], seed, out)
    t0 = time.perf_counter()
    e = evaluate(str(out / "final"), caches["full"], "heldout", device="cpu", max_batches=s.eval_batches)
    r.update({k: e[k] for k in ("ce", "top1_agreement", "ece", "kl_to_teacher", "positions")},
             eval_seconds=time.perf_counter() - t0)
    shutil.rmtree(out / "final", ignore_errors=True)  # ~180 MB per student; the numbers are all we keep
    done.write_text(json.dumps({"settings": s.row_key(), "result": r}, indent=1))
    print(f"{name} seed {seed}: held-out CE {r['ce']:.4f}, top-1 {r['top1_agreement']:.4f}, ECE {r['ece']:.4f}, "
          f"{r['tokens']} tokens, train {r['train_seconds']:.0f} s", file=sys.stderr, flush=True)
    return r


def summarize(runs: dict[str, dict[int, dict]], s: QualitySettings, caches: dict[str, str]) -> dict:
    """Per method: mean, min, max of each metric over seeds; gap closed per seed against that seed's rows."""
    out = {}
    for name, per_seed in runs.items():
        row = {}
        for key in ("ce", "top1_agreement", "ece", "kl_to_teacher", "train_seconds", "tokens", "positions"):
            vals = [r[key] for r in per_seed.values()]
            row[key] = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals),
                        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
        gaps = []
        if "ce_only" in runs and "full_kd" in runs:
            for seed, r in per_seed.items():
                ce, full = runs["ce_only"][seed]["ce"], runs["full_kd"][seed]["ce"]
                if ce != full:
                    gaps.append((ce - r["ce"]) / (ce - full))
        row["gap_closed"] = ({"mean": statistics.fmean(gaps), "min": min(gaps), "max": max(gaps)} if gaps else None)
        method = METHODS[name]
        row["bytes_per_token"] = bytes_per_token(caches[method.cache]) if method.cache and name != "ce_only" else None
        row["seeds"] = sorted(per_seed)
        out[name] = row
    return out


def compact_verdict(runs: dict[str, dict[int, dict]]) -> tuple[list[str], bool | None]:
    """Issue 17's acceptance: the compact top-64 row's held-out CE (mean over seeds) lies within the plain top-64
    row's seed range [min, max]; with the per-seed differences (a seed is the same batch order for both rows)."""
    if not {"top64", "top64_compact"} <= set(runs):
        return [], None
    plain, compact = runs["top64"], runs["top64_compact"]
    seeds = sorted(set(plain) & set(compact))
    lo, hi = min(plain[x]["ce"] for x in seeds), max(plain[x]["ce"] for x in seeds)
    mean = statistics.fmean(compact[x]["ce"] for x in seeds)
    within = lo <= mean <= hi
    lines = [f"Compact top-64 (6-bit) against plain top-64, same loss, seeds and batches: mean held-out CE {mean:.3f}, "
             f"plain's seed range [{lo:.3f}, {hi:.3f}]: **{'within' if within else 'outside'}** the seed spread. "
             "Per seed (compact - plain): "
             + ", ".join(f"seed {x} {compact[x]['ce'] - plain[x]['ce']:+.3f}" for x in seeds) + ". Both rows train "
             "with the plain top-64 row's loss, `fkl_renorm` (the 64 entries renormalised, the tail unused), so the "
             "rows differ only in the stored values of entries 2-64: the compact cache's 6-bit codes against the "
             "exact float32 log-probs."]
    return lines, within


def markdown(table: dict, s: QualitySettings, command: str, row_seconds: float, build: dict,
             verdict: list[str]) -> str:
    first = next(iter(table.values()))
    evaluated = f"the first {s.eval_batches} batches of 8 sequences" if s.eval_batches else "the whole split"
    lines = [
        f"Command (repository root): `{command}`",
        "",
        f"Machine: {processor()} ({platform.machine()}), shared with other jobs while "
        f"it ran (timings are indicative only). Cache build {build['seconds']:.0f} s; training and evaluation summed "
        f"over the rows {row_seconds / 60:.1f} min (rows finished by an earlier invocation with the same settings are "
        "reused, so this is the cost of the whole table, not of the last invocation).",
        "",
        f"Teacher SmolLM2-135M-Instruct; cache built once with the transformers backend over {build['tokens']} tokens of "
        f"standard-library source ({build['train_tokens']} train, {build['heldout_tokens']} held-out), top-k 64, "
        "50 RS-KD draws"
        + ("; k=12 caches derived with `kdcache convert --top-k 12 --drop-samples`"
           if any(METHODS[n].cache == "k12" for n in table) else "")
        + (", the compact top-64 with `kdcache convert --top-k 64 --drop-samples --topk-encoding compact "
           "--logprob-bits 6`" if "top64_compact" in table else "") + ". Student: "
        f"{s.layers} layers copied from the teacher's. Each run: {s.steps} steps x {s.batch_size} sequences x "
        f"{s.seq_len} tokens (~{first['tokens']['mean']:.0f} tokens), AdamW lr {s.lr} "
        f"({s.warmup_steps} warmup steps, cosine), alpha 0 for KD rows, temperature 1, seeds {', '.join(map(str, s.seeds))}. "
        f"Metrics on {first['positions']['mean']:.0f} held-out positions ({evaluated}): "
        "CE of the real next token, top-1 agreement with the teacher, ECE (15 bins). "
        "Values are mean [min, max] over seeds; gap closed = (CE_ce_only - CE) / (CE_ce_only - CE_full_kd), per seed.",
        "",
        "| method | held-out CE | top-1 agreement | ECE | gap closed | cache bytes/token | train s/run |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(d: dict | None, fmt: str = "{:.3f}") -> str:
        if d is None:
            return "n/a"
        return f"{fmt.format(d['mean'])} [{fmt.format(d['min'])}, {fmt.format(d['max'])}]"

    for name, row in table.items():
        bpt = "n/a" if row["bytes_per_token"] is None else f"{row['bytes_per_token']:.0f}"
        lines.append(f"| {METHODS[name].label} | {cell(row['ce'])} | {cell(row['top1_agreement'])} | {cell(row['ece'])} "
                     f"| {cell(row['gap_closed'], '{:.2f}')} | {bpt} | {row['train_seconds']['mean']:.0f} |")
    lines += [
        "",
        "Cache bytes/token: file bytes of the cache the row trains on (all shards, Parquet, zstd) over its tokens; "
        "they include input ids, target log-prob and tail (4 B each). The RS-KD cache also keeps a top-1 entry, "
        "because the format requires k >= 1. CE only needs no teacher fields; full KD needs the teacher itself.",
        "",
        *([*verdict, ""] if verdict else []),
        "Our order, best held-out CE first: " + " < ".join(
            f"{METHODS[n].label} {table[n]['ce']['mean']:.3f}" for n in sorted(table, key=lambda n: table[n]["ce"]["mean"])),
    ]
    paper = compare_with_paper(table)
    if paper:
        lines += ["", "The RS-KD paper's pairwise orders at 300M (its top-50 mapped to our top-64, its ghost token to "
                      "top-12 + tail):", *paper]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = QualitySettings()
    p.add_argument("--out", default=d.out)
    p.add_argument("--corpus-chars", type=int, default=d.corpus_chars)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--eval-batches", type=int, default=d.eval_batches, help="held-out batches of 8 (0: all)")
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)), help="comma-separated")
    p.add_argument("--methods", default=",".join(d.methods), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--write-results", action="store_true", help="write the table into benchmarks/RESULTS.md")
    p.add_argument("--section", default="Quality", help="the RESULTS.md section it replaces (another one for a "
                                                       "subset of --methods)")
    a = p.parse_args(argv)
    s = QualitySettings(out=a.out, corpus_chars=a.corpus_chars, seq_len=a.seq_len, layers=a.layers, steps=a.steps,
                        batch_size=a.batch_size, lr=a.lr, warmup_steps=a.warmup_steps, eval_batches=a.eval_batches,
                        seeds=tuple(int(x) for x in a.seeds.split(",")), methods=tuple(a.methods.split(",")))
    unknown = [m for m in s.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if a.write_results and a.section == "Quality" and set(s.methods) != set(METHODS):
        p.error("--write-results with a subset of --methods would replace the whole Quality table: give --section")

    t0 = time.perf_counter()
    caches = build_caches(s)
    from formats.reader import open_cache

    splits = open_cache(caches["full"]).manifest.splits()
    build_file = Path(s.out) / "build.json"
    build = {"tokens": sum(v["tokens"] for v in splits.values()), "train_tokens": splits["train"]["tokens"],
             "heldout_tokens": splits["heldout"]["tokens"],
             "seconds": json.loads(build_file.read_text())["seconds"] if build_file.exists() else float("nan")}
    runs: dict[str, dict[int, dict]] = {m: {} for m in s.methods}
    for seed in s.seeds:  # seed-major: a cut-short run still has whole seeds
        for name in s.methods:
            runs[name][seed] = run_row(s, name, caches, seed)
    (Path(s.out) / "runs.json").write_text(json.dumps(runs, indent=1))
    table = summarize(runs, s, caches)
    seconds = time.perf_counter() - t0
    command = "python benchmarks/quality.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    row_seconds = sum(r["train_seconds"] + r["eval_seconds"] for per_seed in runs.values() for r in per_seed.values())
    verdict, within = compact_verdict(runs)
    text = markdown(table, s, command.strip(), row_seconds, build, verdict)
    print(text)
    if a.write_results:
        update_results(a.section, text)
    ce = {name: row["ce"]["mean"] for name, row in table.items()}
    rskd_gap = table.get("rskd50", {}).get("gap_closed")
    cached = [n for n in ce if METHODS[n].cache and n != "ce_only"]
    summary = {
        "heldout_ce": ce,
        "rskd_gap_closed": rskd_gap["mean"] if rskd_gap else None,
        # Some cached-KD row beats CE only (mean over seeds, equal tokens); `beats_ce` says which.
        "kd_beats_ce": bool("ce_only" in ce and any(ce[n] < ce["ce_only"] for n in cached)),
        "beats_ce": {n: ce[n] < ce["ce_only"] for n in ce if n != "ce_only"} if "ce_only" in ce else {},
        "gap_closed": {n: (r["gap_closed"] or {}).get("mean") for n, r in table.items()},
        "compact_within_plain_spread": within,  # issue 17: compact top-64's mean CE in plain top-64's seed range
        "top1_agreement": {n: r["top1_agreement"]["mean"] for n, r in table.items()},
        "ece": {n: r["ece"]["mean"] for n, r in table.items()},
        "bytes_per_token": {n: r["bytes_per_token"] for n, r in table.items()},
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()},
        "row_seconds": round(row_seconds, 1),  # train + eval summed over every row of the table
        "invocation_seconds": round(seconds, 1),  # this invocation (rows reused from an earlier one cost nothing)
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
