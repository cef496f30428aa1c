"""The synthetic caches of benchmarks/loader.py, shaped like a SmolLM2 teacher's and written through
`formats.writer.CacheWriter`.

Vocabulary 49152, sequences of 256-1024 tokens, top-k 64 ids (distinct, spread over the vocabulary) with BF16
log-probs that sum with the tail to 1, F32 tail and target. Variants: "plain" is that; "full" adds RS-KD samples
(50 draws in 50 slots, ~12 distinct ids per position, U8 counts) and one BF16 hidden layer (576 wide); "compact"
stores the plain variant's top-k (as F32) with the compact encoding, 6-bit codes (format 1.2, SPEC.md "Compact
top-k"; its ids, spread over the whole vocabulary, compress worse than a real teacher's, but decode the same way).
Random values compress about as badly as real ones, so the decode work is realistic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from formats.manifest import Manifest
from formats.schema import bf16_to_f32, f32_to_bf16, make_fields
from formats.writer import CacheWriter

VOCAB = 49152
K = 64
DRAWS = 50
HIDDEN = 576
LAYER = 30
VARIANTS = ("plain", "full", "compact")


def synthetic_sequence(rng: np.random.Generator, n: int, full: bool, doc: int) -> dict[str, np.ndarray]:
    """One sequence of n tokens with valid SPEC.md content (see the module docstring for its shape)."""
    steps = rng.integers(1, VOCAB // K, size=(n, K))
    topk_ids = ((rng.integers(0, VOCAB, size=(n, 1)) + np.cumsum(steps, axis=1)) % VOCAB).astype(np.int32)
    logits = -np.cumsum(rng.exponential(0.4, size=(n, K)), axis=1)
    tail = rng.uniform(0.005, 0.4, size=n)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True) * (1 - tail)[:, None]
    target = np.where(rng.random(n) < 0.7, np.log(probs[:, 0]), rng.uniform(-15, -3, size=n)).astype(np.float32)
    target[-1] = np.nan
    seq = {
        "input_ids": rng.integers(0, VOCAB, size=n).astype(np.int32),
        "topk_ids": topk_ids,
        "topk_logprobs": f32_to_bf16(np.log(probs).astype(np.float32)),
        "tail_logmass": np.log(tail).astype(np.float32),
        "target_logprob": target,
        "doc_index": np.int64(doc),
    }
    if full:
        distinct = np.clip(rng.poisson(12, size=n), 1, DRAWS)
        ids = np.full((n, DRAWS), -1, np.int32)
        counts = np.zeros((n, DRAWS), np.uint8)
        slot = np.arange(DRAWS)[None, :]
        real = slot < distinct[:, None]
        ids[real] = ((rng.integers(0, VOCAB, size=(n, 1)) + np.cumsum(steps[:, :1].repeat(DRAWS, 1), axis=1)) % VOCAB)[real]
        counts[real] = 1
        counts[:, 0] += (DRAWS - distinct).astype(np.uint8)  # the most drawn id first; counts sum to DRAWS
        seq["sample_ids"], seq["sample_counts"] = ids, counts
        seq[f"hidden/{LAYER}"] = f32_to_bf16(rng.normal(size=(n, HIDDEN)).astype(np.float32))
    return seq


def write_cache(root: Path, backend: str, variant: str, tokens: int, seed: int = 0) -> str:
    """A cache of `variant` (VARIANTS) with about `tokens` tokens at `root`; returns its path."""
    full, compact = variant == "full", variant == "compact"
    fields = make_fields(K, "F32" if compact else "BF16", sample_slots=DRAWS if full else 0,
                         hidden={LAYER: (HIDDEN, "BF16")} if full else None,
                         topk_encoding="compact" if compact else "plain", vocab_size=VOCAB)
    manifest = Manifest(
        backend=backend, fields=fields, teacher={"name": "synthetic", "backend": "benchmark", "dtype": "F32"},
        tokenizer={"fingerprint": "0" * 64, "vocab_size": VOCAB, "special_ids": {"bos": None, "eos": None, "pad": None}},
        build={"top_k": K, "temperature": 1.0, "sample_draws": DRAWS if full else 0},
        corpus={"fingerprint": "0" * 64, "sources": []}, created_by="kdcache benchmarks/loader.py")
    rng = np.random.default_rng(seed)
    done, doc = 0, 0
    with CacheWriter(root, manifest, shard_tokens=65536) as w:
        while done < tokens:
            n = int(rng.integers(256, 1025))
            seq = synthetic_sequence(rng, n, full, doc)
            if compact:
                seq["topk_logprobs"] = bf16_to_f32(seq["topk_logprobs"])
            w.add("train", seq)
            done, doc = done + n, doc + 1
        w.finish()
    return str(root)
