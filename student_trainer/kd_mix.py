"""The training loss: CE on the real next token mixed with one KD loss (`kd_loss`), as `KDConfig` says.

Notation, conventions and tail assumptions as in student_trainer/losses.py, which holds the KD kinds
(`KD_LOSSES`). `prepare_mix` is shared with the chunked output-head loss (head_loss.py): it checks, cleans
and re-tempers the teacher fields once and gives the mixed loss of any rows, so chunks add up to the whole.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from student_trainer.batch import IGNORE_INDEX
from student_trainer.losses import (
    KD_FIELDS,
    KD_LOSSES,
    ce_rows,
    clean_fields,
    position_weights,
    retemper,
    upcast,
    weighted_sum,
)


class RetemperWarning(UserWarning):
    """Teacher log-probs were re-tempered to a temperature other than the capture temperature (approximate)."""


@dataclass
class KDConfig:
    """How `kd_loss` mixes CE and KD: loss = alpha * CE + (1 - alpha) * temperature^2 * KD."""

    kind: str = "fkl_ghost"  # KD loss, a key of KD_LOSSES
    alpha: float = 0.0  # weight of CE on the real next token, in [0, 1]; KD gets 1 - alpha
    temperature: float = 1.0  # T: KD compares softmax(logits / T) with the teacher re-tempered to T
    capture_temperature: float = 1.0  # T_c the cache was built with (manifest build.temperature)
    beta: float = 0.5  # jsd: mixture weight of the teacher
    skew: float = 0.1  # skew_kl: weight of the teacher in the skewed mixture
    vocab_size: int | None = None  # real vocabulary (manifest tokenizer.vocab_size); logits beyond it are dropped

    def __post_init__(self) -> None:
        # The kind is checked where it is looked up (`_kd_rows`); settings.TrainSettings checks it for runs.
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0 or self.capture_temperature <= 0:
            raise ValueError(f"temperatures must be > 0, got {self.temperature} and {self.capture_temperature}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if not 0.0 <= self.skew < 1.0:
            raise ValueError(f"skew must be in [0, 1), got {self.skew}")


def _kd_rows(kind: str) -> Callable[[Tensor, dict, KDConfig], Tensor]:
    rows = KD_LOSSES.get(kind)
    if rows is None:
        raise ValueError(f"KD kind {kind!r} is not one of {', '.join(KD_LOSSES)}")
    return rows


def prepare_mix(mask: Tensor, config: KDConfig, fields: dict[str, Tensor | None], dtype: torch.dtype):
    """Checks, cleans and re-tempers the teacher fields once and returns (loss_sum, f): f the fields flattened
    to (B*T, ...), loss_sum(z, f, sl) the weighted mixed loss summed over rows sl of the flattened batch,
    z (n, V) being those rows' logits. Summed over all rows it is the loss; chunks add up to it."""
    c = config
    kd_rows = _kd_rows(c.kind)
    use_kd, use_ce = c.alpha < 1.0, c.alpha > 0.0
    needed = (KD_FIELDS[c.kind] if use_kd else ()) + (("labels",) if use_ce else ())
    missing = [name for name in needed if fields.get(name) is None]
    if missing:
        raise ValueError(f"KD kind {c.kind!r} with alpha={c.alpha} needs {', '.join(missing)}")
    f = clean_fields(mask, **{name: fields[name] for name in needed})

    if use_kd and c.temperature != c.capture_temperature:
        ratio = c.capture_temperature / c.temperature
        if c.kind == "rskd":
            raise ValueError(
                f"rskd: the samples were drawn at capture temperature {c.capture_temperature} and cannot be "
                f"re-tempered to {c.temperature}; use temperature = capture_temperature"
            )
        if c.kind == "fkl_renorm":  # exact: the loss renormalises p^ratio over K itself
            f["topk_logprobs"] = f["topk_logprobs"].to(dtype) * ratio
        else:
            warnings.warn(
                f"re-tempering cached teacher log-probs from T_c={c.capture_temperature} to T={c.temperature} "
                "treats the tail as one token: approximate (see student_trainer.losses.retemper)",
                RetemperWarning,
                stacklevel=3,
            )
            f["topk_logprobs"], f["tail_logmass"] = retemper(f["topk_logprobs"], f["tail_logmass"], ratio)

    f = {name: x.flatten(0, 1) for name, x in f.items()}  # (B*T, ...)
    kd_w = position_weights(mask, dtype).flatten()  # (B*T,)
    ce_w = position_weights(f["labels"] != IGNORE_INDEX, dtype) if use_ce else None
    t = c.temperature

    def loss_sum(z: Tensor, f: dict[str, Tensor], sl: slice) -> Tensor:
        total = z.new_zeros(())
        if use_ce:  # CE on the real next token at temperature 1 (Hinton)
            total = total + c.alpha * weighted_sum(ce_rows(z, f["labels"][sl]), ce_w[sl])
        if use_kd:
            zt = z if t == 1.0 else z / t
            kd = weighted_sum(kd_rows(zt, {name: x[sl] for name, x in f.items()}, c), kd_w[sl])
            total = total + (1.0 - c.alpha) * t * t * kd
        return total

    return loss_sum, f


def used_vocab(config: KDConfig, rows: int) -> int:
    """Output rows the loss uses: the cache's vocabulary, which may be fewer than the student's (padded) rows."""
    if config.vocab_size is None:
        return rows
    if not 1 <= config.vocab_size <= rows:
        raise ValueError(f"vocab_size {config.vocab_size} does not fit the student's {rows} output rows")
    return config.vocab_size


def kd_loss(
    logits: Tensor,
    mask: Tensor,
    config: KDConfig,
    *,
    labels: Tensor | None = None,
    topk_ids: Tensor | None = None,
    topk_logprobs: Tensor | None = None,
    tail_logmass: Tensor | None = None,
    sample_ids: Tensor | None = None,
    sample_counts: Tensor | None = None,
) -> Tensor:
    """The training loss: alpha * CE + (1 - alpha) * T^2 * KD, each a mean over its positions.

        CE = mean_{t in mask, labels_t != -100} -log softmax(logits_t)[labels_t]          (temperature 1)
        KD = mean_{t in mask} KD_LOSSES[kind](logits_t / T, teacher fields re-tempered from T_c to T)

    T^2 keeps KD gradients on the scale of CE's as T grows (Hinton et al., 2015). Re-tempering (see `retemper`)
    is exact for fkl_renorm and approximate in the tail for the ghost-bucket kinds, which warn
    (RetemperWarning; Python's default filter shows it once per call site) when T != T_c; rskd refuses
    T != T_c. Only the fields the kind needs are required (KD_FIELDS), labels only when alpha > 0.
    logits (B, T, V) any dtype; fields as in losses.py's docstring. Returns a scalar (float32, or float64).
    """
    vocab = used_vocab(config, logits.shape[-1])
    z = upcast(logits[..., :vocab]).flatten(0, 1)  # (B*T, V)
    fields = dict(labels=labels, topk_ids=topk_ids, topk_logprobs=topk_logprobs, tail_logmass=tail_logmass,
                  sample_ids=sample_ids, sample_counts=sample_counts)
    loss_sum, f = prepare_mix(mask, config, fields, z.dtype)
    return loss_sum(z, f, slice(None))
