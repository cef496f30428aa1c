"""Cost of a distillation step from the cache, against a CE-only step and against online KD.

    .venv/bin/python benchmarks/trainer_step.py [--layers 4 --batch 4 --seq-len 256 --rounds 4]

Teacher: the demo teacher (SmolLM2-135M-Instruct, vocab 49152); student: the demo's, `--layers` layers derived
from it (`student_from_teacher`). A small cache (top-k 64 log-probs, tail, 50 RS-KD draws) is built first by
the real builder over stdlib source; its first `--batch`-sequence batches are collated once and held in memory,
so every mode below trains on the same student shape and the very same batches, and the figures are the step
itself (forward, loss, backward, clip, AdamW), not data loading (benchmarks/loader.py measures that).

Modes, one optimizer step each:
- ce_plain:   student logits (B, T, V) in full, `F.cross_entropy` on the real next token: what a CE-only
              trainer runs, and the baseline of both kd_over_ce ratios.
- ce_chunked: our trainer's own CE-only path (`alpha=1`, chunked output-head loss).
- kd_topk:    our trainer, forward KL on the cached top-k with the tail as a ghost bucket (`fkl_ghost`).
- kd_rskd:    our trainer, RS-KD on the cached samples (`rskd`).
- online:     full-logit KD with the teacher in memory (benchmarks/online_kd.py): teacher forward + student.
Time: modes run interleaved in `--rounds` rounds of `--steps` steps after one warm-up step each, all in one
process; the figure is the median step time. Memory: each mode runs again in a fresh subprocess (a warm-up
step, then `--steps` steps), and the figure is its peak resident memory (VmHWM, reset once the batches are
loaded) minus the resident memory at that point, so it counts weights, optimizer state, activations and, for
online KD, the teacher. On CUDA it is torch.cuda.max_memory_allocated instead.

Last line: JSON with kd_over_ce_rskd, kd_over_ce_topk (step time / ce_plain's), online_over_offline_time and
online_over_offline_memory (online / kd_topk), plus every mode's figures. Section "Trainer step" of RESULTS.md.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import statistics
import subprocess
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from loss_memory import rss_bytes  # noqa: E402
from results import update_results  # noqa: E402

SECTION = "Trainer step"
MODES = ("ce_plain", "ce_chunked", "kd_topk", "kd_rskd", "online")
RSKD_GOAL = 1.10


def build_cache(out: Path, tokens: int, seq_len: int) -> None:
    from kdcache.demo import stdlib_corpus

    corpus = stdlib_corpus(out.parent / "corpus", tokens * 4, (1_000, 20_000))  # ~4 characters per token
    subprocess.run([sys.executable, "-m", "kdcache.cli", "build", "--teacher", "default", "--corpus", str(corpus),
                    "--out", str(out), "--top-k", "64", "--sample-draws", "50", "--seq-len", str(seq_len),
                    "--max-batch-tokens", "2048", "--no-progress"], check=True)


def load_batches(cache: str, batch: int, count: int) -> list:
    from student_trainer.loader import EpochReader, LoaderSettings

    reader = EpochReader(cache, "train", LoaderSettings(batch_size=batch, num_workers=0, shuffle_blocks=1 << 30))
    out = []
    for b in reader.batches(0):
        if b.input_ids.shape[0] == batch:  # full batches only: every mode sees the same shapes
            out.append(b)
        if len(out) == count:
            break
    if not out:
        raise SystemExit(f"{cache}: no full batch of {batch} sequences; raise --tokens")
    return out


class Stepper:
    """One student, its optimizer and, for online KD, the teacher; `step(mode, batch)` runs one optimizer step."""

    def __init__(self, cache: str, student_dir: str, device: torch.device, modes: tuple[str, ...]):
        from transformers import AutoModelForCausalLM

        from formats.reader import open_cache
        from student_trainer.train import DistillModel

        m = open_cache(cache).manifest
        self.teacher_dir, self.vocab, self.device = m.teacher["path"], m.vocab_size, device
        self.student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).to(device).train()
        self.model = DistillModel(self.student, None, self.vocab, chunk_tokens=256)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=1e-5)
        self.teacher = None
        if "online" in modes:
            from online_kd import load_teacher

            self.teacher = load_teacher(self.teacher_dir, device)

    def step(self, mode: str, batch) -> float:
        from online_kd import online_step
        from student_trainer.kd_mix import KDConfig

        if mode == "online":
            return online_step(self.student, self.teacher, batch, self.optimizer, vocab_size=self.vocab)["loss"]
        if mode == "ce_plain":
            logits = self.student(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits[..., : self.vocab].float().flatten(0, 1),
                                                     batch.labels.flatten(), ignore_index=-100)
        else:
            kind, alpha = {"ce_chunked": ("fkl_ghost", 1.0), "kd_topk": ("fkl_ghost", 0.0), "kd_rskd": ("rskd", 0.0)}[mode]
            loss, _ = self.model(batch, KDConfig(kind=kind, alpha=alpha, vocab_size=self.vocab), 1.0, 0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_modes(args, device: torch.device) -> dict[str, float]:
    """Median seconds per step of each mode, modes interleaved round by round (shared-machine drift hits all)."""
    batches = [b.to(device) for b in load_batches(args.cache, args.batch, args.steps)]
    stepper = Stepper(args.cache, args.student, device, MODES)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for mode in MODES:  # warm-up: kernels, allocator, optimizer state
        stepper.step(mode, batches[0])
    for r in range(args.rounds):
        order = MODES if r % 2 == 0 else MODES[::-1]
        for mode in order:
            for batch in batches:
                sync(device)
                t0 = time.perf_counter()
                stepper.step(mode, batch)
                sync(device)
                times[mode].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items()}


def reset_peak_rss() -> None:
    """Linux >= 4.0: writing 5 to clear_refs resets this process's VmHWM (peak resident memory) to now."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_of_mode(args, device: torch.device) -> int:
    """Subprocess side: peak memory of `--steps` steps of one mode, above what imports left resident."""
    from transformers import AutoModelForCausalLM  # noqa: F401  (imports are in the baseline, not the figure)

    from online_kd import load_teacher  # noqa: F401
    from student_trainer.train import DistillModel  # noqa: F401

    batches = [b.to(device) for b in load_batches(args.cache, args.batch, args.steps)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = rss_bytes()
    stepper = Stepper(args.cache, args.student, device, (args.memory_mode,))
    for batch in [batches[0], *batches]:
        stepper.step(args.memory_mode, batch)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() - base
    return peak_rss_bytes() - base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4, help="student layers (derived from the teacher)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="distinct batches, stepped once per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache", help="an existing cache with RS-KD samples (default: build one)")
    p.add_argument("--memory-mode", choices=MODES, help=argparse.SUPPRESS)  # subprocess side of the memory figure
    p.add_argument("--student", help=argparse.SUPPRESS)  # the derived student's folder, shared with the subprocesses
    p.add_argument("--no-results", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = p.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.memory_mode:
        print(json.dumps({"peak_bytes": memory_of_mode(args, device)}))
        return
    argv = sys.argv[1:]
    if not args.cache:
        tmp = Path(tempfile.mkdtemp(prefix="kdcache-step-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # caches of hundreds of MB
        args.cache = str(tmp / "cache")
        build_cache(Path(args.cache), args.batch * args.seq_len * (args.steps + 2), args.seq_len)
    if not args.student:  # derive the student once: deriving loads the whole teacher, which no mode should count
        from formats.reader import open_cache
        from student_trainer.student import student_from_teacher

        args.student = tempfile.mkdtemp(prefix="kdcache-step-student-")
        atexit.register(shutil.rmtree, args.student, ignore_errors=True)  # a student folder of ~100 MB
        student, _, _ = student_from_teacher(open_cache(args.cache).manifest.teacher["path"], args.layers, seed=0)
        student.save_pretrained(args.student)
        del student
    seconds = time_modes(args, device)
    memory = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--memory-mode", mode, "--cache", args.cache, "--student", args.student,
               "--batch", str(args.batch), "--steps", str(args.steps), "--device", str(device)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        memory[mode] = json.loads(out.strip().splitlines()[-1])["peak_bytes"]
    figures = {
        "kd_over_ce_rskd": round(seconds["kd_rskd"] / seconds["ce_plain"], 3),
        "kd_over_ce_topk": round(seconds["kd_topk"] / seconds["ce_plain"], 3),
        "online_over_offline_time": round(seconds["online"] / seconds["kd_topk"], 3),
        "online_over_offline_memory": round(memory["online"] / memory["kd_topk"], 3),
        "step_seconds": {m: round(s, 4) for m, s in seconds.items()},
        "peak_bytes": memory,
    }
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    rows = [f"| {m} | {seconds[m]:.3f} | {seconds[m] / seconds['ce_plain']:.3f} | {memory[m] / 2**20:.0f} |" for m in MODES]
    body = "\n".join([
        f"`.venv/bin/python benchmarks/trainer_step.py {' '.join(argv)}`".replace(" `", "`"),
        "",
        f"- device: {name}, torch {torch.__version__}; shared machine: modes interleaved in {args.rounds} rounds, "
        "median step time",
        f"- student: {args.layers} layers derived from SmolLM2-135M-Instruct; batch {args.batch} x up to {args.seq_len} "
        f"tokens; cache top-k 64 + tail, 50 RS-KD draws; AdamW, clip 1.0",
        "",
        "| mode | seconds / step | vs ce_plain | peak memory (MiB) |",
        "|---|---|---|---|",
        *rows,
        "",
        f"kd_over_ce_rskd = **{figures['kd_over_ce_rskd']}** (goal <= {RSKD_GOAL}), kd_over_ce_topk = "
        f"**{figures['kd_over_ce_topk']}**; online KD over offline top-k KD: time **{figures['online_over_offline_time']}x**, "
        f"memory **{figures['online_over_offline_memory']}x**.",
    ])
    print(body)
    if not args.no_results:
        update_results(SECTION, body)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
