"""The output head's loss without the logits: `chunked_kd_loss` takes the student's final hidden states and
the output embedding instead of logits, computes logits a chunk of tokens at a time and takes each chunk's
gradient there and then, so (B, T, V) float32 logits never exist at once. It is tested equal to `kd_loss` on
the full logits (value and gradients), all-masked batch included. Notation as in student_trainer/losses.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from student_trainer.kd_mix import KDConfig, prepare_mix, used_vocab
from student_trainer.losses import upcast


class _ChunkedHeadLoss(torch.autograd.Function):
    """loss_sum(hidden @ weight[:vocab].T) computed `chunk` rows at a time.

    When gradients are needed, forward also takes each chunk's gradient w.r.t. its logits (autograd on the
    chunk alone) and folds it into grad hidden (N, H) and grad weight (V, H) right away; backward only scales
    them by the incoming gradient. So each chunk's logits are computed once, as in an unchunked loss (three
    matmuls per chunk: logits, grad hidden, grad weight), instead of being recomputed in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, loss_sum, fields, vocab, chunk):
        w = weight[:vocab]  # (V, H)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_h else None  # (N, H)
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None  # (V_full, H)
        for s in range(0, hidden.shape[0], chunk):
            sl = slice(s, s + chunk)
            if not (need_h or need_w):
                total += loss_sum(upcast(hidden[sl] @ w.T), fields, sl)  # chunk logits (n, V)
                continue
            with torch.enable_grad():
                z = upcast(hidden[sl] @ w.T).detach().requires_grad_()  # (n, V)
                part = loss_sum(z, fields, sl)
                (grad_z,) = torch.autograd.grad(part, z)
            total += part.detach()
            grad_z = grad_z.to(hidden.dtype)  # (n, V)
            if need_h:
                grad_h[sl] = grad_z @ w
            if need_w:
                grad_w[:vocab].addmm_(grad_z.T.to(acc_dtype), hidden[sl].to(acc_dtype))
            del z, grad_z, part
        # Kept on ctx, not saved for backward: they are our own buffers, which backward scales in place and hands
        # over (a scaled copy would briefly hold a second (V, H) float32 matrix).
        ctx.grads = (grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.grads is None:
            raise RuntimeError("chunked_kd_loss: a second backward through the same loss is not supported")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        if grad_h is not None:
            grad_h.mul_(grad_total.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_total.to(grad_w.dtype)).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


def chunked_kd_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    mask: Tensor,
    config: KDConfig,
    *,
    labels: Tensor | None = None,
    topk_ids: Tensor | None = None,
    topk_logprobs: Tensor | None = None,
    tail_logmass: Tensor | None = None,
    sample_ids: Tensor | None = None,
    sample_counts: Tensor | None = None,
    chunk_tokens: int = 128,
) -> Tensor:
    """`kd_loss(hidden @ lm_head_weight.T, ...)` without ever holding (B, T, V) float32 logits.

    hidden (B, T, H): the student's final hidden states (after its final norm); lm_head_weight (V, H): its output
    embedding (no bias, as in Llama/Qwen). Logits are computed for `chunk_tokens` positions of the flattened
    B*T at a time (the last chunk may be shorter); when gradients are needed, the gradient of the loss w.r.t.
    that chunk's logits is taken with autograd there and then, and folded into grad_hidden and grad_weight, which
    backward only scales (no recompute: the same matmul count as an unchunked loss).
    Peak memory beyond inputs and gradients is a few (chunk_tokens, V) float32 buffers: about
    6 * chunk_tokens * V * 4 bytes (0.45 GB for 128 tokens at V = 152064;
    benchmarks/loss_memory.py measures it). Same value, same gradients as
    `kd_loss` (tested), all-masked batch included. `config.vocab_size` uses only the first rows of the weight;
    the others get a zero gradient.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    vocab = used_vocab(config, lm_head_weight.shape[0])
    fields = dict(labels=labels, topk_ids=topk_ids, topk_logprobs=topk_logprobs, tail_logmass=tail_logmass,
                  sample_ids=sample_ids, sample_counts=sample_counts)
    loss_sum, f = prepare_mix(mask, config, fields, torch.promote_types(hidden.dtype, torch.float32))
    h = hidden.flatten(0, 1)  # (B*T, H)
    return _ChunkedHeadLoss.apply(h, lm_head_weight, loss_sum, f, vocab, chunk_tokens)
