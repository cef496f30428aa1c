"""`kdcache eval`: how close a student is to the cached teacher on a split, and how good on real tokens.

Metrics, over positions with a next-token target (labels != -100):
- kl_to_teacher: forward KL(p || q) on the (k+1)-bucket coarsening (top-k + tail), a lower bound of the full KL;
- top1_agreement: student argmax == teacher's most probable token;
- top5_overlap: |top-5(student) ∩ top-5(teacher)| / 5 (needs k >= 5);
  (the teacher metrics are None on a samples-only cache, k = 0: its draws give neither p's entropy nor its argmax)
- ce, perplexity: cross-entropy of the real next token, exp of it;
- ece: expected calibration error of the student's top-1 prediction against the real token, 15 equal-width bins;
- bpb: bits per byte, sum of CE (nats) / (ln 2 * bytes of text the predicted tokens stand for), so students with
  different tokenizers compare on the same text (`student_trainer.xtok_align.byte_lengths`: a token's bytes are its
  vocabulary entry's, an added or special token's its content's; formats/SPEC.md, "Cross-tokenizer students").
A student whose tokenizer is not the teacher's is evaluated on its own tokens of the same text (needs a cache with
byte offsets, and the teacher's tokenizer: `teacher_tokenizer`): ce, perplexity, ece and bpb are its own, over all
its predicted tokens; the teacher metrics are None and aligned_fraction says how many of its positions were paired.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from formats.manifest import Manifest
from formats.tokenizer import tokenizer_info
from student_trainer.batch import IGNORE_INDEX
from student_trainer.cache_check import check_output_rows, open_checked_cache
from student_trainer.errors import TrainError
from student_trainer.kd_mix import KDConfig, kd_loss
from student_trainer.loader import EpochReader, LoaderSettings
from student_trainer.student import load_student, resolve_device
from student_trainer.xtok_align import byte_lengths, xtok_aligner

ECE_BINS = 15


def evaluate(student_dir: str, cache_url: str, split: str = "heldout", batch_size: int = 8, device: str = "auto",
             max_batches: int = 0, verify: bool = False, teacher_tokenizer: str = "") -> dict:
    """Metrics of the student at `student_dir` against the cache's teacher on `split` (see the module docstring).

    The cache is checked before the student is loaded: its structure always (`Cache.check_structure`), every
    checksum and value invariant with `verify`, and that `split` has positions to evaluate.
    """
    if batch_size <= 0:
        raise TrainError(f"--batch-size must be positive, got {batch_size}")
    dev = resolve_device(device)
    m = open_checked_cache(cache_url, split, verify=verify, purpose="evaluate").manifest
    model, tokenizer = load_student(student_dir)
    aligner = None
    if tokenizer_info(tokenizer)["fingerprint"] != m.tokenizer["fingerprint"]:
        if "byte_offsets" not in m.fields:
            raise TrainError(f"student {student_dir!r}: its tokenizer differs from the cache's teacher tokenizer, and "
                             "only a cache built with --byte-offsets can evaluate a student with another tokenizer")
        aligner = xtok_aligner("eval", m, cache_url, tokenizer, teacher_tokenizer)
    check_output_rows(model, len(tokenizer) if aligner else m.vocab_size, f"student {student_dir!r}")
    return evaluate_model(model.to(dev), tokenizer, cache_url, split, m, batch_size, max_batches, aligner)


def evaluate_model(model: nn.Module, tokenizer, cache_url: str, split: str, m: Manifest, batch_size: int,
                   max_batches: int = 0, aligner=None) -> dict:
    """The metrics of `model` (a causal LM on its device whose output rows fit its `tokenizer`) on `split` of the
    cache with manifest `m`: the first `max_batches` batches (0: all). `aligner` (xtok_align) maps each batch to the
    student's tokens when its tokenizer is not the teacher's. Runs in eval mode and puts the model back in the mode
    it was in. Metrics over zero positions are refused (TrainError), not reported."""
    dev = next(model.parameters()).device
    vocab = len(tokenizer) if aligner else m.vocab_size
    lengths = torch.from_numpy(byte_lengths(tokenizer))  # (V,) bytes of text per token, for bpb
    reader = EpochReader(cache_url, split, LoaderSettings(batch_size=batch_size, num_workers=0, shuffle_blocks=1 << 30))
    sums = {"kl": 0.0, "top1": 0.0, "top5": 0.0, "ce": 0.0, "n": 0, "bytes": 0, "aligned": 0}
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
                batch, counts = aligner.align(batch) if aligner else (batch, None)
                sums["aligned"] += counts.aligned if counts else 0
                batch = batch.to(dev)
                logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                               use_cache=False).logits[..., :vocab].float()
                mask = batch.labels != IGNORE_INDEX  # a cross-tokenizer batch's kd_mask holds only the paired positions
                n = int(mask.sum())
                if n == 0:
                    continue
                z, labels = logits[mask], batch.labels[mask]  # (n, V), (n,)
                logp = torch.log_softmax(z, dim=-1)
                sums["ce"] += float(-logp.gather(1, labels[:, None]).sum())
                pred = z.argmax(-1)
                sums["bytes"] += int(lengths[labels.cpu()].sum())
                if m.top_k and aligner is None:
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
    teacher = m.top_k and aligner is None
    return {
        "split": split,
        "positions": n,
        "kl_to_teacher": sums["kl"] / n if teacher else None,
        "top1_agreement": sums["top1"] / n if teacher else None,
        "top5_overlap": sums["top5"] / n if teacher and m.top_k >= 5 else None,
        "ce": ce,
        "perplexity": math.exp(min(ce, 50.0)),
        "ece": ece,
        "bpb": sums["ce"] / (math.log(2) * sums["bytes"]) if sums["bytes"] else None,
        "aligned_fraction": sums["aligned"] / n if aligner else None,
    }


def format_table(rows: dict[str, dict]) -> str:
    """Markdown table, one row per named result."""
    keys = ["ce", "bpb", "perplexity", "kl_to_teacher", "top1_agreement", "top5_overlap", "ece", "positions"]
    lines = ["| | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, r in rows.items():
        cells = [f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k)) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
