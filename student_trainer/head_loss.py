"""The output head's loss without the logits: `chunked_kd_loss` takes the student's final hidden states and
the output embedding instead of logits, computes logits a chunk of tokens at a time and takes each chunk's
gradient there and then, so (B, T, V) float32 logits never exist at once. It is tested equal to `kd_loss` on
the full logits (value and gradients), all-masked batch included. Notation as in student_trainer/losses.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from student_trainer.kd_mix import KDConfig, Mix, prepare_mix, used_vocab
from student_trainer.logit_grads import loss_and_grad_


class _ChunkedHeadLoss(torch.autograd.Function):
    """mix.loss_sum(hidden @ weight[:vocab].T) computed `chunk` rows at a time.

    When gradients are needed, forward also takes each chunk's gradient w.r.t. its logits and folds it into grad
    hidden (N, H) and grad weight (V, H) right away; backward only scales them by the incoming gradient. So each
    chunk's logits are computed once, as in an unchunked loss (three matmuls per chunk: logits, grad hidden, grad
    weight), instead of being recomputed in backward. The logits of every chunk go into one float32 buffer, which
    `logit_grads.loss_and_grad_` overwrites with their gradient (autograd on the chunk for the kinds it lacks).
    """

    @staticmethod
    def forward(ctx, hidden, weight, mix, vocab, chunk):
        device = hidden.device.type
        # Under autocast the matmuls run in its dtype: the weight is cast here once (autocast would cast it for every
        # chunk: it caches casts of leaf tensors only, and weight[:vocab] is a view), then autocast is off.
        mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        with torch.autocast(device, enabled=False):
            total, grads = _chunks(hidden, weight, mix, vocab, chunk, mm_dtype, ctx.needs_input_grad[:2])
        # Kept on ctx, not saved for backward: they are our own buffers, which backward scales in place and hands
        # over (a scaled copy would briefly hold a second (V, H) float32 matrix).
        ctx.grads = grads
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
        return grad_h, grad_w, None, None, None


def _chunks(hidden: Tensor, weight: Tensor, mix: Mix, vocab: int, chunk: int, mm_dtype: torch.dtype,
            need: tuple[bool, bool]) -> tuple[Tensor, tuple[Tensor | None, Tensor | None]]:
    """The loss summed chunk by chunk, and (grad hidden, grad weight) where `need` asks for them."""
    need_h, need_w = need
    h_all, w = hidden.to(mm_dtype), weight[:vocab].to(mm_dtype)  # (N, H), (V, H); copies only under autocast
    z_dtype = torch.promote_types(mm_dtype, torch.float32)
    acc_dtype = torch.promote_types(weight.dtype, torch.float32)
    total = torch.zeros((), dtype=z_dtype, device=hidden.device)
    grad_h = torch.zeros_like(hidden) if need_h else None  # (N, H)
    grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None  # (V_full, H)
    rows = min(chunk, hidden.shape[0])
    buf = torch.empty(rows, vocab, dtype=z_dtype, device=hidden.device)  # one chunk's logits, then their gradient
    low = None if mm_dtype == z_dtype else torch.empty(rows, vocab, dtype=mm_dtype, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk):
        h = h_all[s : s + chunk]  # (n, H)
        n = h.shape[0]
        sl, z = slice(s, s + n), buf[:n]  # z (n, V)
        if low is None:
            torch.mm(h, w.T, out=z)
        else:  # bf16 logits, then float32 (as the unchunked loss upcasts them)
            torch.mm(h, w.T, out=low[:n])
            z.copy_(low[:n])
        if not (need_h or need_w):
            total += mix.loss_sum(z, sl)
            continue
        part = loss_and_grad_(mix, z, sl)  # z is now d part / d z
        if part is None:
            part = _autograd_(mix, z, sl)
        total += part.detach()
        if need_h:
            g = z if low is None else low[:n].copy_(z)
            if grad_h.dtype == mm_dtype:
                torch.mm(g, w, out=grad_h[sl])
            else:
                grad_h[sl] = g @ w
        if need_w:
            grad_w[:vocab].addmm_(z.T.to(acc_dtype), h.to(acc_dtype))
    return total, (grad_h, grad_w)


def _autograd_(mix: Mix, z: Tensor, sl: slice) -> Tensor:
    """`loss_and_grad_` by autograd on the chunk (kinds without a closed form there): z becomes d loss / d z."""
    with torch.enable_grad():
        leaf = z.detach().requires_grad_()  # shares z's storage; nothing below writes to it
        part = mix.loss_sum(leaf, sl)
        (grad,) = torch.autograd.grad(part, leaf)
    z.copy_(grad)
    return part


def auto_chunk_tokens(tokens: int, hidden_size: int, hidden_bytes: int, vocab: int) -> int:
    """Chunk rows whose float32 logits take no more memory than the hidden states they come from (tokens x H), at
    least one: the loss then needs about as much memory again as its input (Liger-Kernel's fused linear losses
    size their chunks the same way). Small chunks read the output embedding once per chunk, so at a small
    tokens x H they trade speed for memory; the trainer passes its own `chunk_tokens`."""
    return max(1, tokens * hidden_size * hidden_bytes // (4 * vocab))


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
    chunk_tokens: int | None = None,
) -> Tensor:
    """`kd_loss(hidden @ lm_head_weight.T, ...)` without ever holding (B, T, V) float32 logits.

    hidden (B, T, H): the student's final hidden states (after its final norm); lm_head_weight (V, H): its output
    embedding (no bias, as in Llama/Qwen). Logits are computed for `chunk_tokens` positions of the flattened
    B*T at a time (the last chunk may be shorter; None: `auto_chunk_tokens`); when gradients are needed, the
    gradient of the loss w.r.t. that chunk's logits is taken there and then, and folded into grad_hidden and
    grad_weight, which backward only scales (no recompute: the same matmul count as an unchunked loss).
    Memory beyond inputs and their gradients: one (chunk_tokens, V) float32 buffer (and one in bf16 when hidden
    is bf16) for the kinds `logit_grads` covers (CE, fkl_ghost, rskd), a few such buffers for the others
    (autograd on the chunk); benchmarks/loss_memory.py measures it. Same value, same gradients as
    `kd_loss` (tested), all-masked batch included. `config.vocab_size` uses only the first rows of the weight;
    the others get a zero gradient.
    """
    vocab = used_vocab(config, lm_head_weight.shape[0])
    h = hidden.flatten(0, 1)  # (B*T, H)
    if chunk_tokens is None:
        chunk_tokens = auto_chunk_tokens(h.shape[0], h.shape[1], h.element_size(), vocab)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    fields = dict(labels=labels, topk_ids=topk_ids, topk_logprobs=topk_logprobs, tail_logmass=tail_logmass,
                  sample_ids=sample_ids, sample_counts=sample_counts)
    mix = prepare_mix(mask, config, fields, torch.promote_types(hidden.dtype, torch.float32))
    return _ChunkedHeadLoss.apply(h, lm_head_weight, mix, vocab, chunk_tokens)
