"""Teacher fields for the loss tests, built from a full teacher distribution p exactly as the cache builder
would (top-k, tail mass, RS-KD samples), and dense float64 references that compute each loss from p and q by
its formula, by a different code path than student_trainer/losses.py (probabilities, sums over masks)."""

from __future__ import annotations

import math

import torch

from student_trainer import losses as L

B, T, V, K = 3, 5, 100, 8
DT = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(g: torch.Generator, *shape: int, scale: float = 2.5) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=g, dtype=DT)


def cached_topk(log_p: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """topk_ids, topk_logprobs, tail_logmass from the full log p (..., V): the fields the cache stores."""
    top_lp, top_ids = torch.topk(log_p, k, dim=-1)
    tail = torch.logsumexp(log_p.scatter(-1, top_ids, -math.inf), dim=-1)  # -inf when k = V
    return dict(topk_ids=top_ids.int(), topk_logprobs=top_lp, tail_logmass=tail)


def draw_samples(p: torch.Tensor, draws: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """sample_ids / sample_counts (..., S = draws) as SPEC.md orders them: count descending, then id ascending."""
    flat = p.reshape(-1, p.shape[-1])
    n_vocab = flat.shape[-1]
    picked = torch.multinomial(flat, draws, replacement=True, generator=g)  # (R, N)
    counts = torch.zeros_like(flat, dtype=torch.long).scatter_add_(1, picked, torch.ones_like(picked))  # (R, V)
    key = counts * n_vocab + (n_vocab - 1 - torch.arange(n_vocab))
    order = key.argsort(dim=1, descending=True)[:, :draws]  # (R, S)
    c = counts.gather(1, order)
    ids = torch.where(c > 0, order, -1)
    shape = (*p.shape[:-1], draws)
    return dict(sample_ids=ids.int().reshape(shape), sample_counts=c.to(torch.uint8).reshape(shape))


def some_mask(g: torch.Generator, *shape: int) -> torch.Tensor:
    m = torch.rand(*shape, generator=g) < 0.7
    m.view(-1)[0] = True
    return m


def buckets(probs: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Dense (k+1)-bucket coarsening of probabilities (..., V): the top-k entries, then the sum of the rest."""
    in_k = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, topk_ids.long(), True)
    return torch.cat([probs.gather(-1, topk_ids.long()), (probs * ~in_k).sum(-1, keepdim=True)], dim=-1)


def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(a > 0, a * (a.log() - b.log()), 0.0).sum(-1)


def masked_mean(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return rows[mask].mean()


DENSE = {  # the formula of each divergence on probability vectors P (teacher), Q (student)
    "fkl_ghost": lambda P, Q: kl(P, Q),
    "rkl": lambda P, Q: kl(Q, P),
    "jsd": lambda P, Q: 0.3 * kl(P, 0.3 * P + 0.7 * Q) + 0.7 * kl(Q, 0.3 * P + 0.7 * Q),
    "skew_kl": lambda P, Q: kl(P, 0.1 * P + 0.9 * Q),
    "tvd": lambda P, Q: 0.5 * (P - Q).abs().sum(-1),
}
CALL = {  # the same losses through the public functions
    "fkl_ghost": lambda z, f, m: L.fkl_ghost(z, f["topk_ids"], f["topk_logprobs"], f["tail_logmass"], m),
    "rkl": lambda z, f, m: L.rkl(z, f["topk_ids"], f["topk_logprobs"], f["tail_logmass"], m),
    "jsd": lambda z, f, m: L.jsd(z, f["topk_ids"], f["topk_logprobs"], f["tail_logmass"], m, beta=0.3),
    "skew_kl": lambda z, f, m: L.skew_kl(z, f["topk_ids"], f["topk_logprobs"], f["tail_logmass"], m, skew=0.1),
    "tvd": lambda z, f, m: L.tvd(z, f["topk_ids"], f["topk_logprobs"], f["tail_logmass"], m),
}


def value_and_grad(fn, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().requires_grad_()
    loss = fn(z)
    (g,) = torch.autograd.grad(loss, z)
    return loss.detach(), g


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """max |actual - expected| <= rel * max |expected| (relative to the tensor's scale, not per element)."""
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual - expected).abs().max()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} * {scale:.3g}"


def setup_batch(seed: int, k: int = K):
    g = gen(seed)
    log_p = torch.log_softmax(random_logits(g, B, T, V), -1)
    z = random_logits(g, B, T, V, scale=1.5)
    return log_p, z, cached_topk(log_p, k), some_mask(g, B, T)


def all_fields(seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    g = gen(seed)
    log_p, z, f, mask = setup_batch(seed)
    f |= draw_samples(log_p.exp(), 20, g)
    f["labels"] = torch.randint(0, V, (B, T), generator=g)
    return z, f, mask
