"""`kdcache demo`: the whole job on the embedded default, with evidence that distillation helped.

1. corpus: source files of the running Python's standard library (real text nobody here wrote),
   split into train and held-out by file;
2. cache: `kdcache build` with the embedded teacher (SmolLM2-135M-Instruct), in this process (the demo is the
   front door, so it may call both; the builder and the trainer still meet only in the cache);
3. students: the same student (fewer layers, initialised from the teacher's) trained twice on the
   same tokens and seed: with KD from the cache, and with CE on the real tokens only;
4. evaluation on the held-out files and a report (demo_out/report.md). Both students are also evaluated on the
   held-out split during training (`eval_every`), and heldout_ce.png draws that one quantity for both: their
   training losses are not comparable (KD against the teacher's distribution, CE against the real token).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from cache_builder.build import run_build
from cache_builder.settings import BuildSettings
from student_trainer.evaluate import evaluate, format_table
from student_trainer.settings import load_settings
from student_trainer.train import train

PROFILES = {
    # corpus, held-out fraction, student layers, optimizer steps x batch x sequence length, cached top-k, and the
    # optimizer, which both students share. A short warmup and lr 1e-3 matter on runs this short: with the
    # trainer's default 10 warmup steps a 16-step run spends most of its steps warming up (the KD student then lost
    # to CE only, 7.067 vs 7.047). The KD kind is top-k + tail bucket (fkl_ghost): benchmarks/quality.py measured
    # it ahead of CE only after 20 steps at lr 1e-3, while renormalised top-k (fkl_renorm) ended far behind CE
    # (benchmarks/RESULTS.md, Quality). Quick: 104 s, KD 6.982 vs CE only 7.070 (RESULTS.md, Demo; one seed).
    "quick": {"corpus_chars": 20_000, "file_chars": (1_000, 3_000), "heldout": 0.3, "layers": 4, "steps": 16,
              "batch_size": 4, "seq_len": 128, "top_k": 16, "lr": 1e-3, "warmup_steps": 2, "kd_kind": "fkl_ghost",
              "eval_every": 4},
    # Sized for 2 CPU cores and at most 15 minutes: measured 8 minutes there (cache 159 tok/s, students ~300 tok/s),
    # KD 6.208 vs CE only 6.271 held-out CE (benchmarks/RESULTS.md, Demo).
    "full": {"corpus_chars": 100_000, "file_chars": (1_000, 10_000), "heldout": 0.2, "layers": 4, "steps": 40,
             "batch_size": 4, "seq_len": 256, "top_k": 32, "lr": 1e-3, "warmup_steps": 4, "kd_kind": "fkl_ghost",
             "eval_every": 10},
}


def stdlib_corpus(folder: Path, chars: int, file_chars: tuple[int, int] = (1_000, 10_000)) -> Path:
    """Copy standard-library modules (as .txt documents) until about `chars` characters are collected.
    Smallish files make many documents, so the held-out split (chosen per file by hash) is never empty."""
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for src in sorted(Path(os.__file__).parent.glob("*.py")):
        text = src.read_text(encoding="utf-8", errors="replace")
        if not file_chars[0] <= len(text) <= file_chars[1]:
            continue
        (folder / f"{src.stem}.txt").write_text(text, encoding="utf-8")
        total += len(text)
        if total >= chars:
            break
    return folder


def run_demo(out: str = "demo_out", quick: bool = False, corpus: str | None = None, backend: str = "auto") -> dict:
    p = PROFILES["quick" if quick else "full"]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    corpus_dir = Path(corpus) if corpus else stdlib_corpus(out_dir / "corpus", p["corpus_chars"], p["file_chars"])
    if backend == "auto":
        try:
            import vllm  # noqa: F401

            backend = "vllm" if os.environ.get("KDCACHE_DEMO_VLLM") == "1" else "hf"
        except ImportError:
            backend = "hf"
    cache = out_dir / "cache"
    t0 = time.perf_counter()
    build = BuildSettings(teacher="default", corpus=[str(corpus_dir)], out=str(cache), backend=backend,
                          top_k=p["top_k"], seq_len=p["seq_len"], heldout_fraction=p["heldout"], shard_tokens=16384,
                          max_batch_tokens=2048)
    print(f"$ kdcache build --teacher default --corpus {corpus_dir} --out {cache} --backend {backend} "
          f"--top-k {p['top_k']} --seq-len {p['seq_len']} --heldout-fraction {p['heldout']}", flush=True)
    run_build(build)
    build_s = time.perf_counter() - t0
    runs = {}
    for name, alpha in (("kd", 0.0), ("ce_only", 1.0)):
        t0 = time.perf_counter()
        settings = {"cache": str(cache), "out": str(out_dir / name), "student_layers": p["layers"],
                    "init_from_teacher": "cache", "steps": p["steps"], "batch_size": p["batch_size"], "alpha": alpha,
                    "lr": p["lr"], "warmup_steps": p["warmup_steps"], "kd_kind": p["kd_kind"], "num_workers": 0,
                    "checkpoint_every": 0, "eval_every": p["eval_every"], "seed": 0}
        print(f"$ kdcache train {' '.join(f'--{k.replace(chr(95), chr(45))} {v}' for k, v in settings.items())}",
              flush=True)
        train(load_settings(None, settings))
        runs[name] = {"seconds": time.perf_counter() - t0}
    results = {}
    for name in runs:
        results[name] = evaluate(str(out_dir / name / "final"), str(cache), "heldout")
        results[name]["train_seconds"] = runs[name]["seconds"]
        results[name]["tokens"] = _last_metrics(out_dir / name)["tokens"]
    kd, ce = results["kd"], results["ce_only"]
    verdict = (f"Distillation helped: the KD student's held-out CE is {kd['ce']:.3f} against {ce['ce']:.3f} for the "
               f"CE-only student trained on the same {kd['tokens']} tokens."
               if kd["ce"] < ce["ce"] else
               f"Distillation did NOT help here: the KD student's held-out CE is {kd['ce']:.3f} against "
               f"{ce['ce']:.3f} for the CE-only student on the same {kd['tokens']} tokens.")
    one_seed = ("One seed: the gap between the two students includes the run-to-run variation of training (data "
                "order, initialisation), which one run cannot measure; before reading it as a win, compare it with "
                "the spread over seeds that `benchmarks/quality.py` measures (benchmarks/RESULTS.md, Quality).")
    table = format_table({"KD from cache": kd, "CE only": ce})
    plot = _plot(out_dir, {"KD from cache": "kd", "CE only": "ce_only"})
    total_s = time.perf_counter() - t_start
    report = [
        "# kdcache demo", "",
        f"Teacher: SmolLM2-135M-Instruct ({backend} backend). Student: {p['layers']} layers initialised from the teacher's. "
        f"Corpus: {corpus_dir}. Cache built in {build_s:.0f} s; whole demo {total_s:.0f} s.", "",
        f"Both students: {p['steps']} steps of {p['batch_size']} sequences of up to {p['seq_len']} tokens, AdamW lr "
        f"{p['lr']} ({p['warmup_steps']} warmup steps, cosine decay), seed 0. KD student: {p['kd_kind']} on the cached "
        f"top-{p['top_k']} plus tail mass, no CE term (alpha 0). CE-only student: alpha 1.", "",
        table, "", verdict, one_seed, "",
        f"Bits per byte (bpb: held-out CE in bits over the bytes of text the tokens stand for) compare students with "
        f"different tokenizers on the same text: KD {kd['bpb']:.3f}, CE only {ce['bpb']:.3f} (`kd_kind: uld` or "
        "`byte_align` distill a student with another tokenizer from a cache built with `--byte-offsets`).", "",
    ]
    if plot:
        report += [f"Held-out CE of both students during training, every {p['eval_every']} steps (the last point is "
                   "the table's):", "", f"![held-out CE]({plot.name})", ""]
    (out_dir / "report.md").write_text("\n".join(report))
    print(table)
    print(verdict)
    print(one_seed)
    print(f"report: {out_dir / 'report.md'}")
    summary = {"heldout_ce": {"kd": kd["ce"], "ce_only": ce["ce"]}, "kd_beats_ce": kd["ce"] < ce["ce"],
               "heldout_bpb": {"kd": kd["bpb"], "ce_only": ce["bpb"]},
               "seconds": round(total_s, 1)}
    print(json.dumps(summary))
    return summary


def _last_metrics(run_dir: Path) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def _plot(out_dir: Path, runs: dict[str, str]) -> Path | None:
    """heldout_ce.png: each run's held-out CE (eval_ce in its metrics.jsonl) against the step, on one axis."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, name in runs.items():
        rows = [json.loads(x) for x in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "eval_ce" in r]
        ax.plot([r["step"] for r in rows], [r["eval_ce"] for r in rows], marker="o", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out CE (nats per token)")
    ax.set_title("same student, same tokens and seed: KD from the cache vs CE only", fontsize=9)
    ax.legend()
    fig.tight_layout()
    path = out_dir / "heldout_ce.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
