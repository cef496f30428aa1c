"""Parquet shards: one row per sequence, token fields as list columns (SPEC.md, Backends/Parquet).

A row group holds whole sequences (about `ROW_GROUP_TOKENS` tokens), so streaming reads one row group
at a time and gets numpy views of Arrow buffers without copying.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from formats.errors import CacheError
from formats.schema import FORMAT_NAME, FORMAT_VERSION, FieldSpec, SeqBlock

ROW_GROUP_TOKENS = 16384

_ARROW = {"I32": pa.int32(), "I64": pa.int64(), "U8": pa.uint8(), "U16": pa.uint16(),
          "F32": pa.float32(), "F16": pa.float16(), "BF16": pa.uint16()}


def arrow_type(spec: FieldSpec) -> pa.DataType:
    t = _ARROW[spec.dtype]
    if spec.shape:
        t = pa.list_(t, spec.shape[0])  # fixed_size_list
    return pa.list_(t) if spec.per == "token" else t


def arrow_schema(fields: dict[str, FieldSpec]) -> pa.Schema:
    meta = {
        "kdcache.format": FORMAT_NAME,
        "kdcache.format_version": FORMAT_VERSION,
        "kdcache.fields": json.dumps({n: s.to_json() for n, s in fields.items()}, sort_keys=True),
    }
    return pa.schema([pa.field(n, arrow_type(s), nullable=False) for n, s in fields.items()], metadata=meta)


def _column(block: SeqBlock, name: str, spec: FieldSpec) -> pa.Array:
    if spec.per == "sequence":
        arr = block.sequence[name]
        values = pa.array(arr.reshape(-1), type=_ARROW[spec.dtype])
        return pa.FixedSizeListArray.from_arrays(values, spec.shape[0]) if spec.shape else values
    arr = block.token[name]
    values = pa.array(arr.reshape(-1), type=_ARROW[spec.dtype])
    if spec.shape:
        values = pa.FixedSizeListArray.from_arrays(values, spec.shape[0])
    offsets = pa.array((block.offsets - block.offsets[0]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, values)


def write(path: Path, block: SeqBlock, fields: dict[str, FieldSpec]) -> None:
    """Write `block` as one Parquet file at `path` (the caller publishes it atomically)."""
    schema = arrow_schema(fields)
    with pq.ParquetWriter(
        path, schema, compression="zstd", compression_level=3, use_dictionary=False, write_statistics=False
    ) as writer:
        for start, stop in _row_groups(block.offsets):
            part = block.slice(start, stop)
            writer.write_table(pa.Table.from_arrays([_column(part, n, s) for n, s in fields.items()], schema=schema))


def _row_groups(offsets: np.ndarray) -> Iterator[tuple[int, int]]:
    """Cut sequences into runs of about ROW_GROUP_TOKENS tokens; a run holds at least one sequence."""
    n = len(offsets) - 1
    if n == 0:
        yield 0, 0  # one empty row group keeps the schema readable
        return
    start = 0
    while start < n:
        stop = start + 1
        while stop < n and offsets[stop + 1] - offsets[start] <= ROW_GROUP_TOKENS:
            stop += 1
        yield start, stop
        start = stop


def _numpy(values: pa.Array, spec: FieldSpec, where: str) -> np.ndarray:
    if values.null_count:
        raise CacheError(f"{where}: column has nulls")
    arr = values.to_numpy(zero_copy_only=False)
    if arr.dtype.kind != spec.np_dtype.kind or arr.dtype.itemsize != spec.np_dtype.itemsize:
        raise CacheError(f"{where}: stored as {arr.dtype}, manifest says {spec.dtype}")
    return arr.view(spec.np_dtype)


def _block_from_table(table: pa.Table, fields: dict[str, FieldSpec], where: str) -> SeqBlock:
    """Numpy views of one row group's columns; checks every column against the field table."""
    if set(table.column_names) != set(fields):
        raise CacheError(f"{where}: columns {sorted(table.column_names)} differ from the manifest fields {sorted(fields)}")
    offsets = None
    block = SeqBlock(offsets=np.zeros(1, dtype=np.int64))
    for name, spec in fields.items():
        col = table.column(name)
        if col.type != arrow_type(spec):
            raise CacheError(f"{where}: column {name!r} has type {col.type}, expected {arrow_type(spec)}")
        arr = col.chunk(0) if col.num_chunks == 1 else pa.concat_arrays(col.chunks) if col.num_chunks else pa.array([], arrow_type(spec))
        if spec.per == "token":
            offs = arr.offsets.to_numpy().astype(np.int64)
            offs -= offs[0]
            if offsets is None:
                offsets = offs
            elif not np.array_equal(offs, offsets):
                raise CacheError(f"{where}: column {name!r} has sequence lengths that differ from input_ids")
            values = arr.flatten()
            if spec.shape:
                values = values.flatten()
            block.token[name] = _numpy(values, spec, f"{where} column {name!r}").reshape(-1, *spec.shape)
        else:
            values = arr.flatten() if spec.shape else arr
            block.sequence[name] = _numpy(values, spec, f"{where} column {name!r}").reshape(-1, *spec.shape)
    block.offsets = offsets if offsets is not None else np.zeros(table.num_rows + 1, dtype=np.int64)
    return block


class ParquetShard:
    """Reads one Parquet shard: whole, by row group, or a range of sequences."""

    def __init__(self, source, fields: dict[str, FieldSpec], where: str):
        # `source` is a local path or an open binary file from fsspec.
        self.fields = fields
        self.where = where
        try:
            self.file = pq.ParquetFile(source, memory_map=isinstance(source, str))
        except (pa.ArrowInvalid, OSError) as e:
            raise CacheError(f"{where}: not a readable Parquet file ({e})") from None
        meta = self.file.metadata
        self.rows_per_group = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        kv = self.file.schema_arrow.metadata or {}
        if kv.get(b"kdcache.format") != FORMAT_NAME.encode():
            raise CacheError(f"{where}: not a kdcache shard (no kdcache.format in its metadata)")

    @property
    def num_sequences(self) -> int:
        return sum(self.rows_per_group)

    @property
    def num_tokens(self) -> int:
        """Tokens from the footer alone: the value count of the input_ids column (sequences are never empty)."""
        meta = self.file.metadata
        cols = [i for i in range(meta.num_columns) if meta.schema.column(i).path.split(".")[0] == "input_ids"]
        if len(cols) != 1:
            raise CacheError(f"{self.where}: no input_ids column")
        return sum(meta.row_group(g).column(cols[0]).num_values for g in range(meta.num_row_groups))

    def _read_group(self, i: int) -> SeqBlock:
        try:
            table = self.file.read_row_group(i)
        except (pa.ArrowInvalid, OSError) as e:
            raise CacheError(f"{self.where}: row group {i} is unreadable ({e})") from None
        return _block_from_table(table, self.fields, f"{self.where} row group {i}")

    def block_ranges(self) -> list[tuple[int, int]]:
        """(first, stop) sequence ranges of the read units (row groups), in order."""
        stops = np.cumsum(self.rows_per_group).tolist()
        return [(stop - rows, stop) for rows, stop in zip(self.rows_per_group, stops) if rows]

    def iter_blocks(self) -> Iterator[SeqBlock]:
        for i in range(len(self.rows_per_group)):
            yield self._read_group(i)

    def read_all(self) -> SeqBlock:
        return SeqBlock.concat(list(self.iter_blocks()), self.fields)

    def read_range(self, start: int, stop: int) -> SeqBlock:
        """Sequences start:stop of this shard (reads only the row groups that hold them)."""
        parts, first = [], 0
        for i, rows in enumerate(self.rows_per_group):
            lo, hi = max(start, first), min(stop, first + rows)
            if lo < hi:
                parts.append(self._read_group(i).slice(lo - first, hi - first))
            first += rows
        return parts[0] if len(parts) == 1 else SeqBlock.concat(parts, self.fields)
