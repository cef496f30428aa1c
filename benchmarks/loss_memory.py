"""Peak memory of the chunked KD loss versus the naive one at a Qwen-sized vocabulary (V = 152064).

    .venv/bin/python benchmarks/loss_memory.py [--device cpu|cuda] [--batch 2 --seq 512 --hidden 896]

What runs: one forward + backward of the training loss (default: fkl_ghost on the top-32 plus CE, alpha = 0.5)
for a student whose final hidden states are hidden (B, T, H) and whose output embedding is W (V, H), both
requiring gradients.
- naive:   logits = hidden @ W.T, the full (B, T, V) float32 tensor, then `kd_loss(logits, ...)`; autograd keeps
           the logits and the (B, T, V) intermediates of the log-softmax-type reductions for backward.
- chunked: `chunked_kd_loss(hidden, W, ..., chunk_tokens=C)`: logits for C tokens at a time, recomputed in
           backward; grad W accumulated in place.
The script checks that both give the same loss and the same gradients w.r.t. hidden and W.

How peak memory is measured: each variant runs in a fresh subprocess, so neither the other variant's buffers
nor the allocator's cache can blur the figure. A tiny warm-up call first loads the kernels; then the inputs are
built, and the figure is the peak during forward + backward minus what was allocated just before it (inputs and
weights excluded, the gradients of hidden and W included, since both variants must produce them):
- CPU: peak resident set size (getrusage ru_maxrss, a high-water mark kept by the kernel) minus the resident set
  size read from /proc/self/statm just before the step. Tensors this large are mmap'ed by glibc and returned on
  free, so RSS follows live tensor memory; inputs are generated without any (B, T, V) temporary.
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before.

Sizes: B=2, T=512, H=896 (Qwen2.5-0.5B's width) keep the naive variant at a few GB of host memory and the whole
script at a few minutes on 2 CPU cores; real training batches are larger, which only helps the chunked variant
(its extra memory does not grow with B*T). chunk_tokens defaults to 64 here, below the library's 128: at this
small B*T the chunked variant's floor is grad W itself (0.51 GiB), and its per-chunk buffers (about
6 * chunk_tokens * V * 4 bytes) must stay well under the naive variant's. The last line printed is JSON with
chunked_peak_bytes, naive_peak_bytes and ratio; a section "Loss memory" in benchmarks/RESULTS.md is added or
updated.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from results import RESULTS, update_results  # noqa: E402  (benchmarks/results.py, shared by the benchmarks)
from student_trainer.head_loss import chunked_kd_loss  # noqa: E402
from student_trainer.kd_mix import KDConfig, kd_loss  # noqa: E402

SECTION = "Loss memory"
TARGET_RATIO = 0.3


def make_inputs(args, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """hidden (B, T, H), W (V, H), teacher fields and mask; nothing of size (B, T, V) is ever created."""
    g = torch.Generator().manual_seed(0)
    b, t, h, v, k = args.batch, args.seq, args.hidden, args.vocab, args.topk
    dtype = getattr(torch, args.dtype)
    hidden = torch.randn(b, t, h, generator=g).to(device, dtype).requires_grad_()
    weight = (0.02 * torch.randn(v, h, generator=g)).to(device, dtype).requires_grad_()
    start = torch.randint(0, v, (b, t, 1), generator=g)
    fields = {
        "topk_ids": ((start + 997 * torch.arange(k)) % v).int(),  # distinct while 997 * k < V
        "topk_logprobs": (torch.log_softmax(torch.randn(b, t, k, generator=g), -1).sort(-1, descending=True).values
                          + torch.log(torch.tensor(0.9))),  # top-k hold 0.9 of the mass
        "tail_logmass": torch.full((b, t), float(torch.log(torch.tensor(0.1)))),
        "labels": torch.randint(0, v, (b, t), generator=g),
    }
    fields = {name: x.to(device) for name, x in fields.items()}
    mask = torch.ones(b, t, dtype=torch.bool, device=device)
    mask[:, -1] = False  # the last position has no next token
    return hidden, weight, fields, mask


def step(variant: str, hidden, weight, fields, mask, cfg: KDConfig, chunk: int) -> torch.Tensor:
    if variant == "naive":
        loss = kd_loss(hidden @ weight.T, mask, cfg, **fields)  # (B, T, V) logits
    else:
        loss = chunked_kd_loss(hidden, weight, mask, cfg, chunk_tokens=chunk, **fields)
    loss.backward()
    return loss.detach()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args) -> None:
    """One variant in this (fresh) process; writes loss and gradients to args.out and prints its figures."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg = KDConfig(kind=args.kind, alpha=args.alpha)
    hidden, weight, fields, mask = make_inputs(args, device)
    # Warm-up on 4 tokens: kernel libraries and thread pools load here, not inside the measured step.
    step(args.worker, hidden[:1, :4].detach().requires_grad_(), weight, {n: x[:1, :4] for n, x in fields.items()},
         mask[:1, :4], cfg, args.chunk_tokens)
    weight.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    t0 = time.perf_counter()
    loss = step(args.worker, hidden, weight, fields, mask, cfg, args.chunk_tokens)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # ru_maxrss is in KiB on Linux
    seconds = time.perf_counter() - t0
    torch.save({"loss": loss.cpu(), "grad_hidden": hidden.grad.cpu(), "grad_weight": weight.grad.cpu()}, args.out)
    print(json.dumps({"peak_bytes": peak, "seconds": seconds}))


def run_variant(variant: str, argv: list[str], out: Path) -> dict:
    cmd = [sys.executable, __file__, *argv, "--worker", variant, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{variant} worker failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the error relative to the tensor's scale."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def device_name(device: str) -> str:
    if device == "cuda":
        return f"cuda: {torch.cuda.get_device_name()}"
    model = platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        model = names[0] if names else model
    return f"cpu: {model}, {torch.get_num_threads()} threads"


def this_devices_section(text: str) -> str:
    """The "Loss memory" section body: `text` for this device, other devices' subsections as they were."""
    old = RESULTS.read_text() if RESULTS.exists() else ""
    found = re.search(rf"^## {re.escape(SECTION)}\n(.*?)(?=^## |\Z)", old, re.S | re.M)
    heading = text.splitlines()[0]
    kept = []
    if found:
        for sub in re.split(r"^(?=### )", found.group(1), flags=re.M)[1:]:
            if sub.splitlines()[0] != heading:
                kept.append(sub.strip() + "\n")
    return "\n".join(kept + [text])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--kind", default="fkl_ghost")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--chunk-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32", help="of hidden and W (the loss math is float32 regardless)")
    p.add_argument("--no-results", action="store_true", help="do not touch benchmarks/RESULTS.md")
    p.add_argument("--worker", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    argv = [a for a in sys.argv[1:] if a != "--no-results"]
    with tempfile.TemporaryDirectory() as tmp:
        res = {v: run_variant(v, argv, Path(tmp) / f"{v}.pt") for v in ("naive", "chunked")}
        naive, chunked = (torch.load(Path(tmp) / f"{v}.pt") for v in ("naive", "chunked"))
    errors = {name: max_rel_error(chunked[name], naive[name]) for name in ("loss", "grad_hidden", "grad_weight")}
    tol = 1e-5 if args.dtype in ("float32", "float64") else 2e-2
    agree = all(e <= tol for e in errors.values())

    n_peak, c_peak = res["naive"]["peak_bytes"], res["chunked"]["peak_bytes"]
    ratio = c_peak / n_peak
    gib = 2.0**30
    b, t, v = args.batch, args.seq, args.vocab
    lines = [
        f"### {device_name(args.device)}",
        "",
        f"_Measured {datetime.date.today().isoformat()}._",
        "",
        f"`.venv/bin/python benchmarks/loss_memory.py {' '.join(argv)}`".replace(" `", "`"),
        "",
        f"B={b}, T={t}, H={args.hidden}, V={v}, {args.dtype} inputs, kind={args.kind}, alpha={args.alpha}, "
        f"top-k={args.topk}, chunk_tokens={args.chunk_tokens}, torch {torch.__version__}. "
        f"One (B, T, V) float32 tensor is {b * t * v * 4 / gib:.2f} GiB; grad W is "
        f"{v * args.hidden * torch.finfo(getattr(torch, args.dtype)).bits // 8 / gib:.2f} GiB in both.",
        "",
        "| variant | peak bytes (fwd+bwd, above inputs) | GiB | seconds |",
        "|---|---|---|---|",
        f"| naive | {n_peak} | {n_peak / gib:.2f} | {res['naive']['seconds']:.1f} |",
        f"| chunked | {c_peak} | {c_peak / gib:.2f} | {res['chunked']['seconds']:.1f} |",
        "",
        f"ratio chunked / naive = **{ratio:.3f}** (target <= {TARGET_RATIO}). Max error relative to scale, "
        f"chunked vs naive: loss {errors['loss']:.1e}, grad hidden {errors['grad_hidden']:.1e}, "
        f"grad W {errors['grad_weight']:.1e} "
        f"({'agree' if agree else 'DISAGREE'} within {tol:g}).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_results:
        update_results(SECTION, this_devices_section(text))
    print(json.dumps({"chunked_peak_bytes": c_peak, "naive_peak_bytes": n_peak, "ratio": round(ratio, 4)}))
    if not agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
