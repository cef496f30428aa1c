"""The ceiling benchmarks/loader.py measures the loader against: what one core can do with a cache's bytes and
nothing else (no collation, batching or hand-over to the trainer).

- read + zstd (every cache): every shard file read from the page cache (read once before, to warm it) and every
  compressed page / chunk in it zstd-decompressed (Parquet: the pages named by the column chunks' page headers;
  Zarr: the inner chunks named by each shard file's index), no decoding beyond that;
- + compact decode (a compact top-k cache): decoding a compact top-k is part of decompressing it, so its ceiling
  adds the time the codec takes to turn the stored parts back into `topk_ids` / `topk_logprobs` (each shard's
  rank table, then `decode_topk` per read block, as the readers do). The read + zstd figure is kept beside it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from formats.parquet_pages import column_pages
from formats.reader import open_cache
from formats.schema import topk_encoding_of
from formats.topk_codec import decode_table, decode_topk, encode_topk


def parquet_pages(path: str, data: bytes) -> list[tuple[int, int, int]]:
    """(offset, compressed size, uncompressed size) of every page of every column chunk of a Parquet file
    (page headers parsed by the reader's own Thrift parser)."""
    meta = pq.ParquetFile(path).metadata
    buf = memoryview(data)
    pages = []
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(g).column(c)
            start = col.data_page_offset if col.dictionary_page_offset is None else min(col.dictionary_page_offset, col.data_page_offset)
            pages += [(p["body"], p["compressed"], p["uncompressed"]) for p in column_pages(buf, start, col.total_compressed_size)]
    return pages


def zarr_chunks(shard_dir: str) -> list[tuple[str, list[tuple[int, int, int]]]]:
    """(file, [(offset, compressed size, uncompressed size)]) of every inner chunk of every array of a Zarr shard."""
    import zarr

    out = []
    group = zarr.open_group(zarr.storage.LocalStore(shard_dir, read_only=True), mode="r")
    arrays = [(name, arr) for name, arr in group.arrays()]
    for sub, subgroup in group.groups():  # hidden/<L>, and the parts of a compact top-k
        arrays += [(f"{sub}/{name}", arr) for name, arr in subgroup.arrays()]
    for name, arr in arrays:
        if arr.size == 0:
            continue
        inner = int(np.prod(arr.chunks)) * arr.dtype.itemsize
        per_shard = int(np.prod([s // c for s, c in zip(arr.shards, arr.chunks)]))
        path = os.path.join(shard_dir, name, "c", *["0"] * arr.ndim)
        with open(path, "rb") as f:
            f.seek(-(per_shard * 16 + 4), os.SEEK_END)  # index at the end: (offset, nbytes) uint64 pairs + crc32c
            index = np.frombuffer(f.read(per_shard * 16), "<u8").reshape(-1, 2)
        out.append((path, [(int(o), int(n), inner) for o, n in index if o != 2**64 - 1]))
    return out


def ceiling(url: str) -> dict:
    """One core's ceiling for the cache at `url` (see the module docstring): seconds to read and zstd-decompress
    every shard, plus, for a compact top-k, seconds to decode it (`compact_decode_s`, else 0); each the faster of
    two passes (the machine is shared). `zstd_tok_s` leaves the compact decode out, `tok_s` counts it."""
    cache = open_cache(url)
    codec = pa.Codec("zstd")
    units = []  # (file path, [(offset, compressed, uncompressed)])
    for entry in cache.shards("train"):
        path = cache.path_of(entry)
        if cache.manifest.backend == "parquet":
            units.append((path, parquet_pages(path, Path(path).read_bytes())))
        else:
            units += zarr_chunks(path)
    for path, _ in units:  # warm the page cache
        Path(path).read_bytes()
    best = (float("inf"), 0.0, 0.0)
    for _ in range(2):
        t_read = t_dec = 0.0
        raw = packed = 0
        for path, pages in units:
            t0 = time.perf_counter()
            with open(path, "rb") as f:
                data = memoryview(f.read())
            t1 = time.perf_counter()
            for off, comp, uncomp in pages:
                codec.decompress(pa.py_buffer(data[off : off + comp]), decompressed_size=uncomp)
                raw, packed = raw + uncomp, packed + comp
            t_read, t_dec = t_read + t1 - t0, t_dec + time.perf_counter() - t1
        if t_read + t_dec < best[0]:
            best = (t_read + t_dec, t_read, t_dec)
    _, t_read, t_dec = best
    t_compact = compact_decode_s(cache)
    tokens = cache.manifest.totals()["tokens"]
    return {"tokens": tokens, "read_s": t_read, "decompress_s": t_dec, "compact_decode_s": t_compact,
            "zstd_tok_s": tokens / (t_read + t_dec), "tok_s": tokens / (t_read + t_dec + t_compact),
            "compressed_bytes": packed, "raw_bytes": raw, "decompress_gb_s": raw / t_dec / 1e9}


def compact_decode_s(cache) -> float:
    """Seconds to decode the compact top-k of every read block of `cache` from its stored parts, the faster of two
    passes; 0 for a plain top-k. The parts are the writer's own encoding of each whole shard's logical arrays
    (`encode_topk`, outside the clock), checked to give the shard's rank table and to decode to what the reader
    returns; per shard the clock covers `decode_table`, per read block `decode_topk`."""
    enc = topk_encoding_of(cache.manifest.fields)
    if enc is None:
        return 0.0
    jobs = []  # (parts of a shard, [(first, stop) token rows of each read block])
    for entry in cache.shards("train"):
        shard = cache.open_shard(entry)
        blocks = [shard.read_range(a, b) for a, b in shard.block_ranges()]
        ids = np.concatenate([b.token["topk_ids"] for b in blocks])  # (T, k)
        lp = np.concatenate([b.token["topk_logprobs"] for b in blocks])  # (T, k) float32
        parts = encode_topk(ids, lp, enc)
        if not np.array_equal(decode_table(parts.table_diff, enc, entry.path), shard.table):
            raise SystemExit(f"{entry.path}: the re-encoded rank table differs from the shard's")
        ends = np.cumsum([0] + [b.num_tokens for b in blocks])
        rows = list(zip(ends[:-1].tolist(), ends[1:].tolist()))
        for (a, b), block in zip(rows, blocks):
            got = _decode(parts, a, b, shard.table, enc, entry.path)
            if not (np.array_equal(got[0], block.token["topk_ids"]) and np.array_equal(got[1], block.token["topk_logprobs"])):
                raise SystemExit(f"{entry.path}: the re-encoded parts do not decode to what the reader returns")
        jobs.append((parts, rows, entry.path))
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        for parts, rows, where in jobs:
            table = decode_table(parts.table_diff, enc, where)
            for a, b in rows:
                _decode(parts, a, b, table, enc, where)
        best = min(best, time.perf_counter() - t0)
    return best


def _decode(parts, a: int, b: int, table: np.ndarray, enc, where: str) -> tuple[np.ndarray, np.ndarray]:
    return decode_topk(parts.top1_id[a:b], parts.top1_logprob[a:b], [p[a:b] for p in parts.rank_planes],
                       parts.codes[a:b], table, enc, where)
