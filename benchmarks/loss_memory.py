"""Peak memory of the chunked KD loss versus the naive one at a Qwen-sized vocabulary (V = 152064, or --vocab).

    .venv/bin/python benchmarks/loss_memory.py [--device cpu|cuda] [--batch 2 --seq 512 --hidden 896] [--vocab V]

What runs: one forward + backward of the training loss (default: fkl_ghost on the top-32 plus CE, alpha = 0.5)
for a student whose final hidden states are hidden (B, T, H) and whose output embedding is W (V, H), both
requiring gradients.
- naive:   logits = hidden @ W.T, the full (B, T, V) float32 tensor, then `kd_loss(logits, ...)`; autograd keeps
           the logits and the (B, T, V) intermediates of the log-softmax-type reductions for backward.
- chunked: `chunked_kd_loss(hidden, W, ..., chunk_tokens=C)`: logits for C tokens at a time into one float32
           buffer, which the closed-form gradient overwrites (student_trainer/logit_grads.py); grad W accumulated
           in place.
The script checks that the chunked variant is as accurate as the naive one: a third run (reference) computes the
naive loss and gradients in float64 from the same inputs, and each variant's loss, grad hidden and grad W are
compared with it (max |error| over the tensor's max |value|). Both float32 variants must be within 2 sqrt(V)
float32 epsilons of it (9.3e-5 at V = 152064), twice the typical rounding of a float32 sum of V terms, which grad
hidden is; bf16 inputs within 2e-2. The script exits 1 otherwise. On a 2-core AMD EPYC the chunked variant is the
less accurate one: MKL's float32 matmuls there, for some row counts (1, 2, 6; not 4, 8 or 16), sum over V with about
10x the error of larger ones (1e-5 of the scale at V = 152064, whatever the blocking), and the memory-first chunks
are 6 and 3 tokens; on a Xeon the two variants agreed to 2e-7 (benchmarks/RESULTS.md, "Loss memory").

How peak memory is measured: each variant runs in a fresh subprocess, so neither the other variant's buffers
nor the allocator's cache can blur the figure. A tiny warm-up call first loads the kernels; then the inputs are
built, and the figure is the peak during forward + backward minus what was allocated just before it (inputs and
weights excluded, the gradients of hidden and W included, since both variants must produce them):
- CPU: peak resident set size (the kernel's high-water mark, VmHWM in /proc/self/status) minus the resident set
  size just before the step. The mark is first lowered to the current size (/proc/self/clear_refs, Linux 4.0+), so
  it is the step's own peak and not an earlier phase's (building W takes a temporary of W's size); where that
  file cannot be written, the figure is the process's lifetime peak, an upper bound, and the script says so.
  Tensors this large are mmap'ed by glibc and returned on free, so RSS follows live tensor memory; inputs are
  generated without any (B, T, V) temporary.
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before.

Sizes: B=2, T=512, H=896 (Qwen2.5-0.5B's width) keep the naive variant at a few GB of host memory and the whole
script at a few minutes on 2 CPU cores. At this small B*T the chunked variant's floor is grad W itself (0.51 GiB
at V = 152064, 0.14x of the naive peak), so its buffer must be small: --chunk-tokens 0 (the default) takes the
library's memory-first rule, chunk logits no larger than the hidden states (`head_loss.auto_chunk_tokens`: 6
tokens here), which reads W once per chunk and so runs slower than larger chunks (the seconds column; the
trainer passes its own chunk_tokens, 256 by default). Real training batches are larger, which only helps the
chunked variant. The last line printed is JSON with chunked_peak_bytes, naive_peak_bytes, ratio and
chunk_tokens; the subsection of the device and vocabulary in "Loss memory" of benchmarks/RESULTS.md is updated.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from results import processor, update_subsection  # noqa: E402  (benchmarks/results.py, shared by the benchmarks)
from student_trainer.head_loss import auto_chunk_tokens, chunked_kd_loss  # noqa: E402
from student_trainer.kd_mix import KDConfig, kd_loss  # noqa: E402

SECTION = "Loss memory"
TARGET_RATIO = 0.15
VARIANTS = ("naive", "chunked", "reference")


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
    if variant in ("naive", "reference"):
        loss = kd_loss(hidden @ weight.T, mask, cfg, **fields)  # (B, T, V) logits
    else:
        loss = chunked_kd_loss(hidden, weight, mask, cfg, chunk_tokens=chunk or None, **fields)
    loss.backward()
    return loss.detach()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Lower the kernel's high-water mark of this process's RSS to its current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """VmHWM: the highest RSS since the process started or since `reset_peak_rss`."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))  # kB


def worker(args) -> None:
    """One variant in this (fresh) process; writes loss and gradients to args.out and prints its figures.
    The reference is the naive variant in float64 on the same inputs (rounded to --dtype first)."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg = KDConfig(kind=args.kind, alpha=args.alpha)
    hidden, weight, fields, mask = make_inputs(args, device)
    if args.worker == "reference":
        hidden, weight = (x.detach().double().requires_grad_() for x in (hidden, weight))
    # Warm-up on 4 tokens: kernel libraries and thread pools load here, not inside the measured step.
    step(args.worker, hidden[:1, :4].detach().requires_grad_(), weight, {n: x[:1, :4] for n, x in fields.items()},
         mask[:1, :4], cfg, args.chunk_tokens)
    weight.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        if not reset_peak_rss():
            print("loss_memory: /proc/self/clear_refs not writable: the peak is the process's lifetime peak (an upper "
                  "bound)", file=sys.stderr)
        base = rss_bytes()
    t0 = time.perf_counter()
    loss = step(args.worker, hidden, weight, fields, mask, cfg, args.chunk_tokens)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss_bytes() - base
    seconds = time.perf_counter() - t0
    torch.save({"loss": loss.cpu(), "grad_hidden": hidden.grad.cpu(), "grad_weight": weight.grad.cpu()}, args.out)
    print(json.dumps({"peak_bytes": peak, "seconds": seconds}))


def run_variant(variant: str, argv: list[str], out: Path) -> dict:
    cmd = [sys.executable, __file__, *argv, "--worker", variant, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{variant} worker failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def error_bound(dtype: str, vocab: int) -> tuple[float, str]:
    """The largest error relative to scale either variant may have against the float64 reference, and why."""
    if dtype in ("float32", "float64"):
        return 2 * vocab**0.5 * torch.finfo(torch.float32).eps, "2 sqrt(V) float32 epsilons"
    return 2e-2, "16-bit inputs"  # bf16/fp16: the logits themselves are rounded to 8 or 11 bits


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the error relative to the tensor's scale."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


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
    p.add_argument("--chunk-tokens", type=int, default=0, help="0: the library's default (auto_chunk_tokens)")
    p.add_argument("--dtype", default="float32", help="of hidden and W (the loss math is float32 regardless)")
    p.add_argument("--no-results", action="store_true", help="do not touch benchmarks/RESULTS.md")
    p.add_argument("--worker", choices=["naive", "chunked", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    argv = [a for a in sys.argv[1:] if a != "--no-results"]
    with tempfile.TemporaryDirectory() as tmp:
        res = {v: run_variant(v, argv, Path(tmp) / f"{v}.pt") for v in VARIANTS}
        got = {v: torch.load(Path(tmp) / f"{v}.pt") for v in VARIANTS}
    names = ("loss", "grad_hidden", "grad_weight")
    errors = {v: {n: max_rel_error(got[v][n], got["reference"][n]) for n in names} for v in ("naive", "chunked")}
    bound, why = error_bound(args.dtype, args.vocab)
    agree = all(e <= bound for v in errors.values() for e in v.values())

    n_peak, c_peak = res["naive"]["peak_bytes"], res["chunked"]["peak_bytes"]
    ratio = c_peak / n_peak
    gib = 2.0**30
    b, t, v = args.batch, args.seq, args.vocab
    itemsize = torch.finfo(getattr(torch, args.dtype)).bits // 8
    chunk = args.chunk_tokens or auto_chunk_tokens(b * t, args.hidden, itemsize, v)
    lines = [
        f"### {args.device}, V={v}: {processor()}, {torch.get_num_threads()} threads",
        "",
        f"_Measured {datetime.date.today().isoformat()}._",
        "",
        f"`.venv/bin/python benchmarks/loss_memory.py {' '.join(argv)}`".replace(" `", "`"),
        "",
        f"B={b}, T={t}, H={args.hidden}, V={v}, {args.dtype} inputs, kind={args.kind}, alpha={args.alpha}, "
        f"top-k={args.topk}, chunk_tokens={chunk}{'' if args.chunk_tokens else ' (auto)'}, torch {torch.__version__}. "
        f"One (B, T, V) float32 tensor is {b * t * v * 4 / gib:.2f} GiB; grad W is "
        f"{v * args.hidden * itemsize / gib:.2f} GiB in both.",
        "",
        "| variant | peak bytes (fwd+bwd, above inputs) | GiB | seconds |",
        "|---|---|---|---|",
        f"| naive | {n_peak} | {n_peak / gib:.2f} | {res['naive']['seconds']:.1f} |",
        f"| chunked | {c_peak} | {c_peak / gib:.2f} | {res['chunked']['seconds']:.1f} |",
        "",
        f"ratio chunked / naive = **{ratio:.3f}** (target <= {TARGET_RATIO}). Max error relative to scale against "
        f"the float64 reference (loss, grad hidden, grad W): naive "
        + ", ".join(f"{errors['naive'][n]:.1e}" for n in names) + "; chunked "
        + ", ".join(f"{errors['chunked'][n]:.1e}" for n in names)
        + f" ({'both within' if agree else 'NOT ALL WITHIN'} {bound:.1e}, {why}).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_results:
        update_subsection(SECTION, text)
    print(json.dumps({"chunked_peak_bytes": c_peak, "naive_peak_bytes": n_peak, "ratio": round(ratio, 4),
                      "chunk_tokens": chunk, "chunked_seconds": round(res["chunked"]["seconds"], 1),
                      "naive_seconds": round(res["naive"]["seconds"], 1)}))
    if not agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
