"""Full-logit KD with the teacher in memory: the reference that offline (cached) KD is measured against.

Online KD runs the teacher on every batch and compares the student with the teacher's whole distribution, so it
needs no tail assumption and no sampling; it costs a teacher forward per step. Benchmarks feed it the same
`student_trainer.batch.Batch`es as the offline trainer (the cache supplies input_ids and position_ids; its teacher
fields are ignored here), so the two differ only in where the teacher distribution comes from.

Shapes: B sequences, T positions, V vocabulary (the cache's real vocabulary; padded output rows are dropped).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from student_trainer.batch import IGNORE_INDEX


def load_teacher(path: str, device: torch.device | str = "cpu") -> nn.Module:
    """The teacher as an HF causal LM in fp32, eval mode, with no parameter requiring grad."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    teacher.to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def teacher_logits(teacher: nn.Module, batch, vocab_size: int | None = None) -> Tensor:
    """(B, T, V) fp32 teacher logits for a Batch (its input_ids and position_ids), sliced to `vocab_size`.

    `vocab_size` is the cache's real vocabulary (manifest vocab_size); None keeps every output row. The forward
    runs under inference_mode; the result is cloned outside it, because inference tensors cannot be saved for the
    student's backward (the KL multiplies by p).
    """
    with torch.inference_mode():
        # attention_mask=None as in the trainer: padding is at the end and position_ids mark packed documents.
        out = teacher(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
        z = out.logits[..., :vocab_size].float()  # (B, T, V)
    return z.clone()


def full_kd_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0,
                 alpha: float = 0.0, labels: Tensor | None = None) -> Tensor:
    """alpha * CE + (1 - alpha) * T^2 * KL(p_T || q_T) over the full vocabulary, in fp32.

        p_T = softmax(teacher_logits / T),  q_T = softmax(student_logits / T)
        KL_t = sum_{v < V} p_T(v) (log p_T(v) - log q_T(v))           (exact: no top-k, no tail bucket)
        CE_t = -log softmax(student_logits)[labels_t]                  (temperature 1, -100 ignored)

    Same mix as `student_trainer.losses.kd_loss`: each term is a mean over the masked positions (CE over those
    that also have a label). student_logits (B, T, V_s) with V_s >= V (extra rows are dropped), teacher_logits
    (B, T, V), mask (B, T) bool, labels (B, T). Returns a scalar; 0.0 with zero gradient when nothing is masked in.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha > 0 and labels is None:
        raise ValueError("full_kd_loss with alpha > 0 needs labels")
    vocab = teacher_logits.shape[-1]
    keep = mask.bool()  # (B, T)
    z = student_logits[..., :vocab][keep].float()  # (n, V): only masked-in positions, to bound memory
    total = z.sum() * 0.0  # a zero that keeps the graph (all-masked batch: zero value, zero gradient)
    if z.shape[0] == 0:
        return total
    if alpha < 1.0:
        t = temperature
        log_p = torch.log_softmax(teacher_logits[keep].float() / t, dim=-1)  # (n, V)
        log_q = torch.log_softmax(z / t, dim=-1)  # (n, V)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (n,); p = 0 gives 0 * finite = 0
        total = total + (1.0 - alpha) * t * t * kl.mean()
    if alpha > 0.0:
        y = labels[keep]  # (n,)
        has = y != IGNORE_INDEX
        if has.any():
            nll = torch.logsumexp(z[has], -1) - z[has].gather(-1, y[has, None])[:, 0]  # (n_labelled,)
            total = total + alpha * nll.mean()
    return total


def online_step(student: nn.Module, teacher: nn.Module, batch, optimizer: torch.optim.Optimizer,
                temperature: float = 1.0, alpha: float = 0.0, grad_clip: float = 1.0,
                vocab_size: int | None = None) -> dict:
    """One optimizer step of online KD: teacher forward, student forward and backward, clip, step, zero grads.

    The caller sets the learning rate (schedules live with the caller, as in the trainer). `batch` must already be
    on the models' device. Returns {"loss", "grad_norm", "tokens"} as Python numbers.
    """
    t_logits = teacher_logits(teacher, batch, vocab_size)  # (B, T, V)
    s_logits = student(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    loss = full_kd_loss(s_logits, t_logits, batch.kd_mask, temperature, alpha, batch.labels)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": float(loss.detach()), "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens": int(batch.num_tokens)}
