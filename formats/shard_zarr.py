"""Zarr v3 shards: one group per shard, a flat token axis plus `seq_offsets` (SPEC.md, Backends/Zarr).

Each array uses the sharding codec, so it is one file on disk with inner chunks of about
`CHUNK_TOKENS` tokens: the write unit is the whole array (written once, never concurrently), the read
unit one inner chunk.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from formats.errors import CacheError
from formats.schema import FORMAT_NAME, FORMAT_VERSION, FieldSpec, SeqBlock

CHUNK_TOKENS = 16384
_ZARR_DTYPE = {"I32": "int32", "I64": "int64", "U8": "uint8", "U16": "uint16",
               "F32": "float32", "F16": "float16", "BF16": "uint16"}


def _create(group, name: str, data: np.ndarray, chunk_rows: int, attributes: dict | None = None) -> None:
    from zarr.codecs import ZstdCodec

    rows = max(1, min(chunk_rows, len(data)))
    chunks = (rows, *data.shape[1:])
    shard = (max(rows, -(-len(data) // rows) * rows), *data.shape[1:])
    arr = group.create_array(
        name, shape=data.shape, dtype=data.dtype, chunks=chunks, shards=shard,
        compressors=ZstdCodec(level=3), fill_value=0, attributes=attributes or {},
    )
    if data.size:
        arr[...] = data


def write(path: Path, block: SeqBlock, fields: dict[str, FieldSpec]) -> None:
    """Write `block` as a Zarr v3 group at directory `path` (the caller publishes it atomically)."""
    import zarr

    attrs = {
        "kdcache.format": FORMAT_NAME,
        "kdcache.format_version": FORMAT_VERSION,
        "kdcache.fields": {n: s.to_json() for n, s in fields.items()},
    }
    group = zarr.create_group(zarr.storage.LocalStore(str(path)), zarr_format=3, attributes=attrs)
    _create(group, "seq_offsets", np.ascontiguousarray(block.offsets - block.offsets[0], dtype="<i8"), 1 << 20)
    hidden = None
    for name, spec in fields.items():
        data = (block.token if spec.per == "token" else block.sequence)[name]
        attributes = {"kdcache_dtype": "BF16"} if spec.dtype == "BF16" else None
        target, leaf = group, name
        if name.startswith("hidden/"):
            hidden = hidden or group.create_group("hidden")
            target, leaf = hidden, name.split("/", 1)[1]
        # Chunk by bytes, not rows, so wide hidden rows do not make huge chunks.
        row_bytes = max(1, data[:1].nbytes)
        _create(target, leaf, data, max(1, min(CHUNK_TOKENS, (4 << 20) // row_bytes)), attributes)


class ZarrShard:
    """Reads one Zarr shard: whole, in token-bounded blocks, or a range of sequences."""

    def __init__(self, store, fields: dict[str, FieldSpec], where: str, tokens: int, sequences: int):
        import zarr

        self.fields = fields
        self.where = where
        try:
            self.group = zarr.open_group(store, mode="r", zarr_format=3)
        except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise CacheError(f"{where}: not a readable Zarr v3 group ({type(e).__name__}: {e})") from None
        if self.group.attrs.get("kdcache.format") != FORMAT_NAME:
            raise CacheError(f"{where}: not a kdcache shard (no kdcache.format in its attributes)")
        # Check every array's metadata against the manifest before reading any data, so a shard
        # claiming absurd sizes is refused without allocating.
        self.arrays = {"seq_offsets": self._array("seq_offsets", (sequences + 1,), "I64")}
        for name, spec in fields.items():
            rows = tokens if spec.per == "token" else sequences
            self.arrays[name] = self._array(name, (rows, *spec.shape), spec.dtype)
        self.offsets = self._read("seq_offsets", slice(None))
        if self.offsets[0] != 0 or self.offsets[-1] != tokens or np.any(np.diff(self.offsets) < 0):
            raise CacheError(f"{where}: seq_offsets do not cut {tokens} tokens into sequences")

    def _array(self, name: str, shape: tuple, dtype: str):
        try:
            arr = self.group[name]
        except KeyError:
            raise CacheError(f"{self.where}: array {name!r} is missing") from None
        if tuple(arr.shape) != shape:
            raise CacheError(f"{self.where}: array {name!r} has shape {tuple(arr.shape)}, manifest says {shape}")
        if str(arr.dtype) != _ZARR_DTYPE[dtype]:
            raise CacheError(f"{self.where}: array {name!r} has dtype {arr.dtype}, manifest says {dtype}")
        return arr

    def _read(self, name: str, rows: slice) -> np.ndarray:
        try:
            return np.asarray(self.arrays[name][rows])
        except (ValueError, RuntimeError, OSError) as e:
            raise CacheError(f"{self.where}: array {name!r} is unreadable ({type(e).__name__}: {e})") from None

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def read_range(self, start: int, stop: int) -> SeqBlock:
        lo, hi = int(self.offsets[start]), int(self.offsets[stop])
        block = SeqBlock(offsets=self.offsets[start : stop + 1] - lo)
        for name, spec in self.fields.items():
            if spec.per == "token":
                block.token[name] = self._read(name, slice(lo, hi))
            else:
                block.sequence[name] = self._read(name, slice(start, stop))
        return block

    def read_all(self) -> SeqBlock:
        return self.read_range(0, self.num_sequences)

    def block_ranges(self, block_tokens: int = CHUNK_TOKENS) -> list[tuple[int, int]]:
        """(first, stop) sequence ranges of about `block_tokens` tokens (at least one sequence each)."""
        ranges, start, n = [], 0, self.num_sequences
        while start < n:
            stop = int(np.searchsorted(self.offsets, self.offsets[start] + block_tokens, side="right")) - 1
            stop = min(max(stop, start + 1), n)
            ranges.append((start, stop))
            start = stop
        return ranges

    def iter_blocks(self, block_tokens: int = CHUNK_TOKENS * 4) -> Iterator[SeqBlock]:
        for start, stop in self.block_ranges(block_tokens):
            yield self.read_range(start, stop)
