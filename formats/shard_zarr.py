"""Zarr v3 shards: one group per shard, a flat token axis plus `seq_offsets` (SPEC.md, Backends/Zarr).

Each array uses the sharding codec, so it is one file on disk with inner chunks of at most `CHUNK_TOKENS`
rows and about `CHUNK_BYTES`: the write unit is the whole array (written once, never concurrently), the read
unit one inner chunk.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from formats.errors import CacheError
from formats.layout import shard_table, stored_fields, to_logical, to_stored
from formats.schema import FORMAT_NAME, FORMAT_VERSION, MAX_VOCAB, FieldSpec, SeqBlock, zstd_level

# Readers stream a shard in blocks of whole sequences, about BLOCK_TOKENS tokens each; the loader's epoch order
# is built from these blocks, so BLOCK_TOKENS must not change. A block starts and ends inside inner chunks, and
# a chunk is decompressed whole: inner chunks much smaller than a block keep that overshoot small. Chunks as
# long as a block made every block decompress ~2.1x the rows it returns (benchmarks/loader.py, plain Zarr);
# at 256 KiB / 4096 rows the overshoot is under 1.25x. Size: a real top-64 cache 356.7 -> 353.1 B/token, an
# RS-KD one 37.6 -> 39.2 (its zstd-9 sample arrays gain from longer chunks; benchmarks/storage.py). Older
# caches keep the chunks they were written with.
BLOCK_TOKENS = 16384
CHUNK_TOKENS = 4096
CHUNK_BYTES = 256 << 10
_ZARR_DTYPE = {"I32": "int32", "I64": "int64", "U8": "uint8", "U16": "uint16",
               "F32": "float32", "F16": "float16", "BF16": "uint16"}


COMPRESSIONS = ("zstd", "none")


def _create(group, name: str, data: np.ndarray, chunk_rows: int, attributes: dict | None = None,
            compression: str = "zstd", level: int = 3) -> None:
    from zarr.codecs import ZstdCodec

    rows = max(1, min(chunk_rows, len(data)))
    chunks = (rows, *data.shape[1:])
    shard = (max(rows, -(-len(data) // rows) * rows), *data.shape[1:])
    arr = group.create_array(
        name, shape=data.shape, dtype=data.dtype, chunks=chunks, shards=shard,
        compressors=ZstdCodec(level=level) if compression == "zstd" else None, fill_value=0, attributes=attributes or {},
    )
    if data.size:
        arr[...] = data


def write(path: Path, block: SeqBlock, fields: dict[str, FieldSpec], compression: str = "zstd") -> SeqBlock:
    """Write `block` as a Zarr v3 group at directory `path` (the caller publishes it atomically); returns the
    logical block that reading the group gives back (`block` itself unless the top-k is compact: then quantized).

    `compression` "none" exists to measure what zstd saves (benchmarks/storage.py); caches are written with
    zstd (SPEC.md). Readers need no setting: each array's metadata names its codecs."""
    import zarr

    if compression not in COMPRESSIONS:
        raise CacheError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")

    attrs = {
        "kdcache.format": FORMAT_NAME,
        "kdcache.format_version": FORMAT_VERSION,
        "kdcache.fields": {n: s.to_json() for n, s in fields.items()},
    }
    group = zarr.create_group(zarr.storage.LocalStore(str(path)), zarr_format=3, attributes=attrs)
    stored, shard_arrays, logical = to_stored(block, fields)
    _create(group, "seq_offsets", np.ascontiguousarray(stored.offsets - stored.offsets[0], dtype="<i8"), 1 << 20,
            compression=compression)
    subgroups = {}
    for name, spec in stored_fields(fields).items():
        data = {"token": stored.token, "sequence": stored.sequence, "shard": shard_arrays}[spec.per][name]
        attributes = {"kdcache_dtype": "BF16"} if spec.dtype == "BF16" else None
        target, leaf = group, name
        if "/" in name:  # hidden/<L>, and the parts of a compact top-k (topk_ids/top1, ...)
            parent, leaf = name.split("/", 1)
            target = subgroups.get(parent) or subgroups.setdefault(parent, group.create_group(parent))
        # Chunk by bytes, not rows, so wide hidden rows do not make huge chunks.
        row_bytes = max(1, data[:1].nbytes)
        _create(target, leaf, data, max(1, min(CHUNK_TOKENS, CHUNK_BYTES // row_bytes)), attributes, compression,
                zstd_level(name))
    return logical


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
        self.stored = stored_fields(fields)
        for name, spec in self.stored.items():
            rows = {"token": tokens, "sequence": sequences, "shard": None}[spec.per]
            self.arrays[name] = self._array(name, (rows, *spec.shape), spec.dtype)
        self.direct = _direct_readers(store, self.arrays)
        self.offsets = self._read("seq_offsets", slice(None))
        if self.offsets[0] != 0 or self.offsets[-1] != tokens or np.any(np.diff(self.offsets) < 0):
            raise CacheError(f"{where}: seq_offsets do not cut {tokens} tokens into sequences")
        shard_arrays = {n: self._read(n, slice(None)) for n, s in self.stored.items() if s.per == "shard"}
        self.table = shard_table(shard_arrays, fields, where)

    def _array(self, name: str, shape: tuple, dtype: str):
        try:
            arr = self.group[name]
        except KeyError:
            raise CacheError(f"{self.where}: array {name!r} is missing") from None
        except (ValueError, TypeError, json.JSONDecodeError) as e:  # metadata zarr itself finds inconsistent
            raise CacheError(f"{self.where}: array {name!r} is unreadable ({type(e).__name__}: {e})") from None
        if shape[0] is None:  # a shard array: any length up to the largest vocabulary
            if len(arr.shape) != 1 or arr.shape[0] > MAX_VOCAB:
                raise CacheError(f"{self.where}: array {name!r} has shape {tuple(arr.shape)}, expected 1-D of at most {MAX_VOCAB}")
        elif tuple(arr.shape) != shape:
            raise CacheError(f"{self.where}: array {name!r} has shape {tuple(arr.shape)}, manifest says {shape}")
        if str(arr.dtype) != _ZARR_DTYPE[dtype]:
            raise CacheError(f"{self.where}: array {name!r} has dtype {arr.dtype}, manifest says {dtype}")
        return arr

    def _read(self, name: str, rows: slice) -> np.ndarray:
        direct = self.direct.get(name)
        try:
            if direct is not None:
                return direct.read(rows.start or 0, self.arrays[name].shape[0] if rows.stop is None else rows.stop)
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
        for name, spec in self.stored.items():
            if spec.per == "token":
                block.token[name] = self._read(name, slice(lo, hi))
            elif spec.per == "sequence":
                block.sequence[name] = self._read(name, slice(start, stop))
        return to_logical(block, self.fields, self.table, f"{self.where} sequences {start}:{stop}")

    def read_all(self) -> SeqBlock:
        return self.read_range(0, self.num_sequences)

    def block_ranges(self, block_tokens: int = BLOCK_TOKENS) -> list[tuple[int, int]]:
        """(first, stop) sequence ranges of about `block_tokens` tokens (at least one sequence each)."""
        ranges, start, n = [], 0, self.num_sequences
        while start < n:
            stop = int(np.searchsorted(self.offsets, self.offsets[start] + block_tokens, side="right")) - 1
            stop = min(max(stop, start + 1), n)
            ranges.append((start, stop))
            start = stop
        return ranges

    def iter_blocks(self, block_tokens: int = BLOCK_TOKENS * 4) -> Iterator[SeqBlock]:
        for start, stop in self.block_ranges(block_tokens):
            yield self.read_range(start, stop)


class _DirectArray:
    """Rows of one array read straight from its shard file: the shard index, then zstd per inner chunk.

    zarr-python reaches each chunk through its asyncio event loop and codec pipeline, which costs ~1-2 ms
    per read and decodes at a fraction of zstd's speed (benchmarks/loader.py: 2 s per million tokens for a
    top-k cache whose bytes decompress in 0.5 s). kdcache's writer makes one layout only (one shard file per
    array, inner chunks of whole rows, bytes+zstd inside, index at the end with a crc32c), so that layout is
    read here directly; anything else is left to zarr (`_direct_readers` checks the metadata first).
    """

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype, chunk_rows: int, chunks: int,
                 compressed: bool, fill_value):
        self.path, self.shape, self.dtype = path, shape, dtype
        self.chunk_rows, self.chunks, self.compressed, self.fill_value = chunk_rows, chunks, compressed, fill_value
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self._index = None

    def index(self, f) -> np.ndarray:
        """(chunks, 2) uint64 (offset, nbytes) of the inner chunks; checked against its crc32c."""
        if self._index is None:
            import google_crc32c

            size = self.chunks * 16
            f.seek(0, 2)
            file_size = f.tell()
            if file_size < size + 4:
                raise ValueError(f"shard file of {file_size} bytes is shorter than its index")
            f.seek(file_size - size - 4)
            raw = f.read(size + 4)
            if np.uint32(google_crc32c.value(raw[:size])).tobytes() != raw[size:]:
                raise ValueError("shard index checksum mismatch")
            index = np.frombuffer(raw[:size], "<u8").reshape(self.chunks, 2)
            used = index[index[:, 0] != _EMPTY]
            if np.any(used[:, 0] + used[:, 1] > file_size - size - 4):
                raise ValueError("shard index points past the data")
            self._index = index
        return self._index

    def read(self, lo: int, hi: int) -> np.ndarray:
        from numcodecs import Zstd

        hi = min(hi, self.shape[0])
        out = np.empty((max(hi - lo, 0), *self.shape[1:]), self.dtype)
        if hi <= lo:
            return out
        flat = out.reshape(len(out), -1).view(np.uint8).reshape(-1)  # row-major bytes of `out`
        zstd = Zstd()
        with open(self.path, "rb") as f:
            index = self.index(f)
            for c in range(lo // self.chunk_rows, (hi - 1) // self.chunk_rows + 1):
                c_lo, c_hi = c * self.chunk_rows, (c + 1) * self.chunk_rows
                a, b = max(lo, c_lo), min(hi, c_hi)
                dst = flat[(a - lo) * self.row_bytes : (b - lo) * self.row_bytes]
                offset, nbytes = (int(v) for v in index[c])
                if offset == _EMPTY:  # an all-fill chunk is not written
                    out[a - lo : b - lo] = self.fill_value
                    continue
                f.seek(offset)
                data = f.read(nbytes)
                if len(data) != nbytes:
                    raise ValueError(f"chunk {c} is cut short")
                if not self.compressed:
                    raw = np.frombuffer(data, np.uint8)
                elif a == c_lo and b == c_hi:
                    zstd.decode(data, out=dst)  # whole chunk wanted: decompress straight into the result
                    continue
                else:  # into a chunk-sized buffer: a crafted frame header cannot make us allocate more
                    raw = np.empty(self.chunk_rows * self.row_bytes, np.uint8)
                    zstd.decode(data, out=raw)
                if len(raw) != self.chunk_rows * self.row_bytes:
                    raise ValueError(f"chunk {c} holds {len(raw)} bytes, expected {self.chunk_rows * self.row_bytes}")
                dst[:] = raw[(a - c_lo) * self.row_bytes : (b - c_lo) * self.row_bytes]
        return out


_EMPTY = 2**64 - 1


def _direct_readers(store, arrays: dict) -> dict[str, _DirectArray]:
    """Direct readers for the arrays whose metadata is exactly the layout `write` makes, on a local store."""
    import os

    root = getattr(store, "root", None)
    if root is None or type(store).__name__ != "LocalStore":
        return {}
    out = {}
    for name, arr in arrays.items():
        meta = arr.metadata.to_dict()
        codecs = meta.get("codecs", [])
        if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
            continue
        conf = codecs[0]["configuration"]
        inner = [c.get("name") for c in conf["codecs"]]
        endian = conf["codecs"][0].get("configuration", {}).get("endian")
        little = endian == "little" or (endian is None and np.dtype(arr.dtype).itemsize == 1)  # 1-byte types name none
        zstd_ok = inner == ["bytes"] or (inner == ["bytes", "zstd"] and not conf["codecs"][1]["configuration"].get("checksum"))
        index_ok = [c.get("name") for c in conf["index_codecs"]] == ["bytes", "crc32c"] and conf["index_location"] == "end"
        shape = tuple(meta["shape"])
        shard = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        chunk = tuple(conf["chunk_shape"])
        key = meta["chunk_key_encoding"]
        if not (little and zstd_ok and index_ok and key["name"] == "default" and key["configuration"]["separator"] == "/"
                and shape and shape[0] <= shard[0] and shard[1:] == shape[1:] and chunk[1:] == shape[1:]
                and shard[0] % chunk[0] == 0 and not meta.get("storage_transformers")):
            continue
        path = os.path.join(str(root), *name.split("/"), "c", *["0"] * len(shape))
        if not os.path.isfile(path):
            continue  # nothing written (an empty array): zarr returns the fill value
        out[name] = _DirectArray(path, shape, np.dtype(arr.dtype).newbyteorder("<"), chunk[0], shard[0] // chunk[0],
                                 inner == ["bytes", "zstd"], meta["fill_value"])
    return out
