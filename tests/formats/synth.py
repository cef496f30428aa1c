"""Synthetic but valid cache content: teacher distributions drawn at random, fields derived exactly;
plus the small helpers the format tests share (writing a cache, editing its manifest, comparing bytes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from formats.manifest import Manifest, ShardEntry
from formats.schema import FieldSpec, SeqBlock, from_float32, make_fields, top_k_of
from formats.writer import CacheWriter


def random_sequence(rng: np.random.Generator, length: int, fields: dict[str, FieldSpec], vocab: int,
                    draws: int, doc_index: int) -> dict[str, np.ndarray]:
    """One sequence whose stored fields follow SPEC.md from a random full distribution per position."""
    k = top_k_of(fields)  # 0: a samples-only cache
    logits = rng.normal(size=(length, vocab)).astype(np.float32) * 3
    logp = logits - np.log(np.exp(logits.astype(np.float64)).sum(axis=1, keepdims=True)).astype(np.float32)
    order = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    topk = np.take_along_axis(logp, order, axis=1)
    mass = np.exp(topk.astype(np.float64)).sum(axis=1)
    with np.errstate(divide="ignore"):  # mass == 1 (k = vocab): the tail is -inf by definition
        tail = np.where(mass >= 1, -np.inf, np.log1p(-np.minimum(mass, 1))).astype(np.float32)
    if k == 0:
        tail = np.zeros(length, dtype=np.float32)  # log 1 exactly, as the builder stores it
    ids = rng.integers(0, vocab, size=length).astype(np.int32)
    target = np.full(length, np.nan, dtype=np.float32)
    target[:-1] = logp[np.arange(length - 1), ids[1:]]
    seq = {
        "input_ids": ids,
        "tail_logmass": tail,
        "target_logprob": target,
        "doc_index": np.int64(doc_index),
    }
    if k:
        seq["topk_ids"] = order.astype(np.int32)
        seq["topk_logprobs"] = from_float32(topk, fields["topk_logprobs"].dtype)
    if "loss_mask" in fields:
        seq["loss_mask"] = rng.integers(0, 2, size=length).astype(np.uint8)
    if "position_ids" in fields:
        cut = rng.integers(1, length + 1)
        seq["position_ids"] = np.concatenate([np.arange(cut), np.arange(length - cut)]).astype(np.int32)
    if "byte_offsets" in fields:
        starts = np.cumsum(rng.integers(1, 5, size=length)) - 1
        seq["byte_offsets"] = np.stack([starts, starts + 1], axis=1).astype(np.int32)
    if "sample_ids" in fields:
        slots = fields["sample_ids"].shape[0]
        s_ids = np.full((length, slots), -1, dtype=np.int32)
        s_counts = np.zeros((length, slots), dtype=fields["sample_counts"].np_dtype)
        p = np.exp(logp.astype(np.float64))
        for i in range(length):
            drawn = rng.choice(vocab, size=draws, p=p[i] / p[i].sum())
            u, c = np.unique(drawn, return_counts=True)
            o = np.lexsort((u, -c))[:slots]
            u, c = u[o], c[o]
            c[0] += draws - c.sum()  # slots fewer than unique ids: fold the rest into the first (still sums to N)
            s_ids[i, : len(u)], s_counts[i, : len(u)] = u, c
        seq["sample_ids"], seq["sample_counts"] = s_ids, s_counts
    for name, spec in fields.items():
        if name.startswith("hidden/"):
            seq[name] = from_float32(rng.normal(size=(length, spec.shape[0])).astype(np.float32), spec.dtype)
    return seq


def make_manifest(backend: str, fields: dict[str, FieldSpec], vocab: int, draws: int = 0) -> Manifest:
    return Manifest(
        backend=backend,
        fields=fields,
        teacher={"name": "synthetic", "backend": "test", "dtype": "F32"},
        tokenizer={"fingerprint": "0" * 64, "vocab_size": vocab, "special_ids": {"bos": None, "eos": None, "pad": None}},
        build={"top_k": top_k_of(fields), "temperature": 1.0, "sample_draws": draws},
        corpus={"sha256": "0" * 64, "sources": []},
        created_by="kdcache tests",
    )


def default_fields(k: int = 8, **kw) -> dict[str, FieldSpec]:
    return make_fields(k, **kw)


VOCAB = 64
DRAWS = 16
BACKENDS = ("parquet", "zarr")


def rich_fields(k: int = 8, logprob_dtype: str = "F32") -> dict[str, FieldSpec]:
    """Every optional field on: loss_mask, position_ids, byte_offsets, 4 sample slots, two hidden layers."""
    return default_fields(
        k, logprob_dtype=logprob_dtype, sample_slots=4, count_dtype="U8",
        hidden={2: (8, "F16"), 5: (8, "BF16")}, loss_mask=True, position_ids=True, byte_offsets=True,
    )


def make_sequences(lengths: list[int], fields: dict[str, FieldSpec], vocab: int = VOCAB, draws: int = DRAWS,
                   seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Valid sequences of these lengths; doc_index is the position in the list."""
    rng = np.random.default_rng(seed)
    return [random_sequence(rng, n, fields, vocab, draws if "sample_ids" in fields else 0, j)
            for j, n in enumerate(lengths)]


class ShardCutter:
    """A CacheWriter fed one sequence at a time, as the builder cuts shards: a split's buffered sequences become
    a shard (`CacheWriter.write_shard`) once they hold `shard_tokens` tokens; `finish` writes the rest first."""

    def __init__(self, writer: CacheWriter):
        self.writer = writer
        self.pending: dict[str, list[dict[str, np.ndarray]]] = {}

    def __getattr__(self, name: str):
        return getattr(self.writer, name)

    def add(self, split: str, seq: dict[str, np.ndarray]) -> ShardEntry | None:
        self.pending.setdefault(split, []).append(seq)
        if sum(len(q["input_ids"]) for q in self.pending[split]) >= self.writer.shard_tokens:
            return self.flush(split)
        return None

    def flush(self, split: str) -> ShardEntry | None:
        seqs = self.pending.pop(split, [])
        if not seqs:
            return None
        return self.writer.write_shard(split, SeqBlock.from_sequences(seqs, self.writer.manifest.fields))

    def finish(self) -> Manifest:
        for split in list(self.pending):
            self.flush(split)
        return self.writer.finish()

    def __enter__(self) -> "ShardCutter":
        return self

    def __exit__(self, *exc) -> None:
        self.writer.close()


def write_cache(root: Path, backend: str, items: list[tuple[str, dict]], fields: dict[str, FieldSpec],
                vocab: int = VOCAB, draws: int = DRAWS, shard_tokens: int = 20, overwrite: bool = False) -> Manifest:
    """Write `(split, sequence)` items in order, cut into shards as the builder cuts them, and finish the cache."""
    draws = draws if "sample_ids" in fields else 0
    with ShardCutter(CacheWriter(root, make_manifest(backend, fields, vocab, draws), shard_tokens,
                                 overwrite=overwrite)) as w:
        for split, seq in items:
            w.add(split, seq)
        return w.finish()


def edit_manifest(root: Path, edit) -> None:
    """Rewrite manifest.json by hand: `edit` changes the parsed JSON object in place."""
    path = Path(root) / "manifest.json"
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj, indent=1))


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality (NaN payloads included): same dtype, same shape, same raw bytes."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
