"""Stored sequences and batches for the loader tests: identities to count deliveries by, batch equality, and
synthetic stored sequences (as a shard reader returns them) for collation without a cache."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from formats.reader import open_cache
from formats.schema import from_float32
from student_trainer.batch import Batch

K = 4  # top-k of the synthetic sequences


def identity(doc: int, ids: np.ndarray) -> tuple[int, bytes]:
    """A sequence's identity: its document and its tokens (trailing zeros dropped, as batches pad with 0)."""
    return int(doc), np.trim_zeros(np.asarray(ids, dtype=np.int64), "b").tobytes()


def stored_sequences(url: str, split: str) -> dict[tuple[int, bytes], dict[str, np.ndarray]]:
    """identity -> the stored sequence, for every sequence of the split (identities are unique)."""
    out = {}
    for block in open_cache(url).iter_blocks(split):
        for j in range(len(block)):
            seq = block.get(j)
            key = identity(seq["doc_index"], seq["input_ids"])
            assert key not in out, "two sequences share an identity; the coverage tests would prove less"
            out[key] = seq
    return out


def delivered(batches: list[Batch]) -> list[tuple[int, bytes]]:
    """Identities of the real rows (filler rows, doc_index -1, left out) of a rank's batches."""
    return [identity(d, b.input_ids[r].numpy()) for b in batches for r, d in enumerate(b.doc_index.tolist()) if d >= 0]


def same_batch(a: Batch, b: Batch) -> bool:
    for f in dataclasses.fields(Batch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif isinstance(x, dict):
            if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
                return False
        elif x != y:
            return False
    return True


def synthetic(ids: list[int], doc: int, seed: int, lp_dtype: str = "F32", **extra) -> dict[str, np.ndarray]:
    """A stored sequence as the reader returns it (token arrays, `doc_index` scalar); the last target is NaN."""
    rng = np.random.default_rng(seed)
    n = len(ids)
    lp = np.sort(np.log(rng.dirichlet(np.ones(K + 1), size=n)[:, :K]).astype(np.float32), axis=1)[:, ::-1]
    target = rng.uniform(-5, 0, n).astype(np.float32)
    target[-1] = np.nan
    return {"input_ids": np.asarray(ids, np.int32), "topk_ids": rng.integers(0, 50, (n, K)).astype(np.int32),
            "topk_logprobs": from_float32(np.ascontiguousarray(lp), lp_dtype),
            "tail_logmass": rng.uniform(-6, -1, n).astype(np.float32), "target_logprob": target,
            "doc_index": np.int64(doc), **extra}
