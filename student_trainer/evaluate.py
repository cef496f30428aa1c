"""`kdcache eval`: how close a student is to the cached teacher on a split, and how good on real tokens.

Metrics, over positions with a next-token target (labels != -100):
- kl_to_teacher: forward KL(p || q) on the (k+1)-bucket coarsening (top-k + tail), a lower bound of the full KL;
- top1_agreement: student argmax == teacher's most probable token;
- top5_overlap: |top-5(student) ∩ top-5(teacher)| / 5 (needs k >= 5);
  (the teacher metrics are None on a samples-only cache, k = 0: its draws give neither p's entropy nor its argmax)
- ce, perplexity: cross-entropy of the real next token, exp of it;
- ece: expected calibration error of the student's top-1 prediction against the real token, 15 equal-width bins.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from formats.manifest import Manifest
from formats.tokenizer import tokenizer_info
from student_trainer.cache_check import check_output_rows, open_checked_cache
from student_trainer.errors import TrainError
from student_trainer.kd_mix import KDConfig, kd_loss
from student_trainer.loader import EpochReader, LoaderSettings
from student_trainer.student import load_student, resolve_device

ECE_BINS = 15


def evaluate(student_dir: str, cache_url: str, split: str = "heldout", batch_size: int = 8, device: str = "auto",
             max_batches: int = 0, verify: bool = False) -> dict:
    """Metrics of the student at `student_dir` against the cache's teacher on `split` (see the module docstring).

    The cache is checked before the student is loaded: its structure always (`Cache.check_structure`), every
    checksum and value invariant with `verify`, and that `split` has positions to evaluate.
    """
    if batch_size <= 0:
        raise TrainError(f"--batch-size must be positive, got {batch_size}")
    dev = resolve_device(device)
    m = open_checked_cache(cache_url, split, verify=verify, purpose="evaluate").manifest
    model, tokenizer = load_student(student_dir)
    if tokenizer_info(tokenizer)["fingerprint"] != m.tokenizer["fingerprint"]:
        raise TrainError(f"student {student_dir!r}: its tokenizer differs from the cache's teacher tokenizer")
    check_output_rows(model, m.vocab_size, f"student {student_dir!r}")
    return evaluate_model(model.to(dev), cache_url, split, m, batch_size, max_batches)


def evaluate_model(model: nn.Module, cache_url: str, split: str, m: Manifest, batch_size: int,
                   max_batches: int = 0) -> dict:
    """The metrics of `model` (a causal LM whose tokenizer and output rows fit the cache, on its device) on `split`
    of the cache with manifest `m`: the first `max_batches` batches (0: all). Runs in eval mode and puts the
    model back in the mode it was in. Metrics over zero positions are refused (TrainError), not reported."""
    dev = next(model.parameters()).device
    reader = EpochReader(cache_url, split, LoaderSettings(batch_size=batch_size, num_workers=0, shuffle_blocks=1 << 30))
    vocab = m.vocab_size
    sums = {"kl": 0.0, "top1": 0.0, "top5": 0.0, "ce": 0.0, "n": 0}
    conf_sum = torch.zeros(ECE_BINS, dtype=torch.float64)
    acc_sum = torch.zeros(ECE_BINS, dtype=torch.float64)
    count = torch.zeros(ECE_BINS, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for i, batch in enumerate(reader.batches(0)):
                if max_batches and i >= max_batches:
                    break
                batch = batch.to(dev)
                logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                               use_cache=False).logits[..., :vocab].float()
                mask = batch.kd_mask
                n = int(mask.sum())
                if n == 0:
                    continue
                z, labels = logits[mask], batch.labels[mask]  # (n, V), (n,)
                logp = torch.log_softmax(z, dim=-1)
                sums["ce"] += float(-logp.gather(1, labels[:, None]).sum())
                pred = z.argmax(-1)
                if m.top_k:
                    kl = kd_loss(logits, mask, KDConfig(kind="fkl_ghost", vocab_size=vocab), topk_ids=batch.topk_ids,
                                 topk_logprobs=batch.topk_logprobs, tail_logmass=batch.tail_logmass)
                    sums["kl"] += float(kl) * n
                    t_ids = batch.topk_ids[mask]  # (n, k)
                    sums["top1"] += float((pred == t_ids[:, 0]).sum())
                    if m.top_k >= 5:
                        s5 = z.topk(5, -1).indices
                        sums["top5"] += float((s5[:, :, None] == t_ids[:, None, :5]).any(-1).sum()) / 5
                conf = logp.max(-1).values.exp().double().cpu()
                correct = (pred == labels).double().cpu()
                bins = torch.clamp((conf * ECE_BINS).long(), max=ECE_BINS - 1)
                conf_sum.index_add_(0, bins, conf)
                acc_sum.index_add_(0, bins, correct)
                count.index_add_(0, bins, torch.ones_like(conf))
                sums["n"] += n
    finally:
        model.train(was_training)
    n = sums["n"]
    if n == 0:
        raise TrainError(f"{cache_url}: no positions to evaluate in split {split!r}"
                         + (f" within its first {max_batches} batches" if max_batches else ""))
    ce = sums["ce"] / n
    nonempty = count > 0
    ece = float(((conf_sum[nonempty] - acc_sum[nonempty]).abs()).sum() / float(count.sum()))
    return {
        "split": split,
        "positions": n,
        "kl_to_teacher": sums["kl"] / n if m.top_k else None,
        "top1_agreement": sums["top1"] / n if m.top_k else None,
        "top5_overlap": sums["top5"] / n if m.top_k >= 5 else None,
        "ce": ce,
        "perplexity": math.exp(min(ce, 50.0)),
        "ece": ece,
    }


def format_table(rows: dict[str, dict]) -> str:
    """Markdown table, one row per named result."""
    keys = ["ce", "perplexity", "kl_to_teacher", "top1_agreement", "top5_overlap", "ece", "positions"]
    lines = ["| | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, r in rows.items():
        cells = [f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k)) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
