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
from formats.layout import TABLE, is_byte_plane, shard_table, stored_fields, to_logical, to_stored
from formats.parquet_pages import NotDirect, direct_column
from formats.schema import FORMAT_NAME, FORMAT_VERSION, FieldSpec, SeqBlock, zstd_level

ROW_GROUP_TOKENS = 16384

_ARROW = {"I32": pa.int32(), "I64": pa.int64(), "U8": pa.uint8(), "U16": pa.uint16(),
          "F32": pa.float32(), "F16": pa.float16(), "BF16": pa.uint16()}


# RS-KD sample slots are stored without their padding: each token's list holds only the drawn ids (and their
# counts), which the spec puts before the padding. Fixed slots padded with -1 / 0 cost ~3.4 B/token more after
# zstd (benchmarks/storage.py), because the padding's length changes from token to token.
RAGGED = {"sample_ids": -1, "sample_counts": 0}  # field -> its padding value


def arrow_type(spec: FieldSpec, name: str = "") -> pa.DataType:
    """The Arrow type of a stored array (formats/layout.py): a field, or a part of a compact top-k."""
    t = _ARROW[spec.dtype]
    if name in RAGGED or spec.per == "shard":  # a shard array is the list of the first row; the others are empty
        return pa.list_(pa.list_(t)) if name in RAGGED else pa.list_(t)
    if is_byte_plane(name):  # one opaque byte string per token: 1 byte per value, not Arrow's 4-byte INT32 for U8
        return pa.list_(pa.binary(spec.shape[0]))
    if spec.shape:
        t = pa.list_(t, spec.shape[0])  # fixed_size_list
    return pa.list_(t) if spec.per == "token" else t


def arrow_schema(fields: dict[str, FieldSpec]) -> pa.Schema:
    """Columns: the stored arrays of `fields`; metadata: the (logical) field table."""
    meta = {
        "kdcache.format": FORMAT_NAME,
        "kdcache.format_version": FORMAT_VERSION,
        "kdcache.fields": json.dumps({n: s.to_json() for n, s in fields.items()}, sort_keys=True),
    }
    stored = stored_fields(fields)
    return pa.schema([pa.field(n, arrow_type(s, n), nullable=False) for n, s in stored.items()], metadata=meta)


def _column(block: SeqBlock, name: str, spec: FieldSpec, drawn: np.ndarray | None, shard: np.ndarray | None) -> pa.Array:
    """One stored array of `block` as its Arrow column; `drawn`: the block's `_drawn_slots` (RS-KD caches);
    `shard`: for a shard array, the array in the block that holds the shard's first row, else None."""
    if spec.per == "shard":
        lengths = np.zeros(len(block) + 1, dtype=np.int32)
        lengths[1:] = len(shard) if shard is not None else 0
        lengths[2:] = lengths[1]  # only the first row holds the array
        values = shard if shard is not None else np.zeros(0, spec.np_dtype)
        return pa.ListArray.from_arrays(pa.array(lengths), pa.array(values, type=_ARROW[spec.dtype]))
    if spec.per == "sequence":
        arr = block.sequence[name]
        values = pa.array(arr.reshape(-1), type=_ARROW[spec.dtype])
        return pa.FixedSizeListArray.from_arrays(values, spec.shape[0]) if spec.shape else values
    arr = block.token[name]
    offsets = pa.array((block.offsets - block.offsets[0]).astype(np.int32))
    if name in RAGGED:
        inner = np.zeros(len(arr) + 1, dtype=np.int32)
        np.cumsum(drawn.sum(axis=1), out=inner[1:])
        per_token = pa.ListArray.from_arrays(pa.array(inner), pa.array(arr[drawn], type=_ARROW[spec.dtype]))
        return pa.ListArray.from_arrays(offsets, per_token)
    if is_byte_plane(name):
        data = pa.py_buffer(np.ascontiguousarray(arr).reshape(-1))
        return pa.ListArray.from_arrays(offsets, pa.Array.from_buffers(pa.binary(spec.shape[0]), len(arr), [None, data]))
    values = pa.array(arr.reshape(-1), type=_ARROW[spec.dtype])
    if spec.shape:
        values = pa.FixedSizeListArray.from_arrays(values, spec.shape[0])
    return pa.ListArray.from_arrays(offsets, values)


def _drawn_slots(block: SeqBlock) -> np.ndarray:
    """(T, S) bool: the slots holding a drawn id. Refuses rows whose padding is not exactly the trailing
    slots with id -1 and count 0 (SPEC.md), which dropping it would not give back."""
    ids, counts = block.token["sample_ids"], block.token["sample_counts"]
    drawn = counts > 0
    trailing = np.arange(drawn.shape[1]) < drawn.sum(axis=1, keepdims=True)
    bad = (drawn != trailing) | ((ids == -1) == drawn)
    if bad.any():
        row = int(np.argmax(bad.any(axis=1)))
        raise CacheError(f"sample_ids/sample_counts row {row}: padding (id -1, count 0) must follow the drawn ids")
    return drawn


def leaf_paths(fields: dict[str, FieldSpec]) -> dict[str, str]:
    """Field -> the path of its Parquet leaf column. Arrow keys per-column writer settings by these paths and
    silently applies its defaults to a column the settings do not name."""
    return {n: n + ".list.element" * (1 if s.per == "shard" or is_byte_plane(n) else (s.per == "token") + bool(s.shape))
            for n, s in fields.items()}


COMPRESSIONS = ("zstd", "none")


def write(path: Path, block: SeqBlock, fields: dict[str, FieldSpec], compression: str = "zstd") -> SeqBlock:
    """Write `block` as one Parquet file at `path` (the caller publishes it atomically); returns the logical
    block that reading the file gives back (`block` itself unless the top-k is compact: then it is quantized).

    `compression` "none" exists to measure what zstd saves (benchmarks/storage.py); caches are written with
    zstd (SPEC.md). Readers need no setting: Parquet records each column chunk's codec."""
    if compression not in COMPRESSIONS:
        raise CacheError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    schema = arrow_schema(fields)
    stored, shard_arrays, logical = to_stored(block, fields)
    fields = stored_fields(fields)
    leaf = leaf_paths(fields)
    codec: dict = {"compression": "none"}
    if compression == "zstd":
        codec = {"compression": "zstd", "compression_level": {leaf[n]: zstd_level(n) for n in fields}}
    # Byte-stream split puts the three zero bytes of each INT32-stored count in streams of their own, which zstd
    # then all but drops (benchmarks/storage.py: 6.9 -> 4.4 B/token for 50 U8 count slots).
    # Float32 per-token values (tail, target, a compact top-1) and a compact top-k's rank table gain the same way,
    # less (benchmarks/RESULTS.md, "Storage size and fidelity": 0.1-0.3 B/token per float column, a quarter of the table).
    encoding = {leaf[n]: "BYTE_STREAM_SPLIT" for n, s in fields.items()
                if n in ("sample_counts", TABLE) or (s.dtype == "F32" and s.per == "token" and not s.shape)}
    with pq.ParquetWriter(path, schema, use_dictionary=False, write_statistics=False, column_encoding=encoding or None,
                          **codec) as writer:
        for start, stop in _row_groups(stored.offsets):
            part = stored.slice(start, stop)
            drawn = _drawn_slots(part) if "sample_ids" in fields else None
            columns = [_column(part, n, s, drawn, shard_arrays.get(n) if start == 0 else None) for n, s in fields.items()]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
    return logical


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


def _bytes(values: pa.Array, spec: FieldSpec, where: str) -> np.ndarray:
    """(rows, m) uint8 view of a fixed_size_binary(m) array."""
    if values.null_count:
        raise CacheError(f"{where}: column has nulls")
    width = spec.shape[0]
    data = np.frombuffer(values.buffers()[1], dtype=np.uint8)
    return data[values.offset * width : (values.offset + len(values)) * width].reshape(len(values), width)


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
    sample_lengths = []  # samples per token of each ragged sample column
    for name, spec in fields.items():
        col = table.column(name)
        want = arrow_type(spec, name)
        if col.type != want and not (name in RAGGED and col.type == arrow_type(spec)):  # 1.0: padded sample slots
            raise CacheError(f"{where}: column {name!r} has type {col.type}, expected {want}")
        ragged = col.type == want and name in RAGGED
        arr = col.chunk(0) if col.num_chunks == 1 else pa.concat_arrays(col.chunks) if col.num_chunks else pa.array([], want)
        if spec.per == "token":
            offs = arr.offsets.to_numpy().astype(np.int64)
            offs -= offs[0]
            if offsets is None:
                offsets = offs
            elif not np.array_equal(offs, offsets):
                raise CacheError(f"{where}: column {name!r} has sequence lengths that differ from input_ids")
            values = arr.flatten()
            if ragged:
                block.token[name], lengths = _pad_slots(values, spec, RAGGED[name], f"{where} column {name!r}")
                sample_lengths.append(lengths)
                continue
            if is_byte_plane(name):
                block.token[name] = _bytes(values, spec, f"{where} column {name!r}")
                continue
            if spec.shape:
                values = values.flatten()
            block.token[name] = _numpy(values, spec, f"{where} column {name!r}").reshape(-1, *spec.shape)
        else:
            values = arr.flatten() if spec.shape else arr
            block.sequence[name] = _numpy(values, spec, f"{where} column {name!r}").reshape(-1, *spec.shape)
    block.offsets = offsets if offsets is not None else np.zeros(table.num_rows + 1, dtype=np.int64)
    if len(sample_lengths) == 2 and not np.array_equal(*sample_lengths):
        raise CacheError(f"{where}: columns 'sample_ids' and 'sample_counts' hold different numbers of samples per token")
    return block


def _pad_slots(per_token: pa.ListArray, spec: FieldSpec, pad: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A ragged sample column (one list per token) back to its (T, S) slots, padded with `pad`; and the
    list lengths (T,)."""
    if per_token.null_count:
        raise CacheError(f"{where}: column has nulls")
    lengths = np.diff(per_token.offsets.to_numpy())
    slots = spec.shape[0]
    if len(lengths) and lengths.max() > slots:
        raise CacheError(f"{where}: a token holds {int(lengths.max())} samples, more than the {slots} slots")
    values = _numpy(per_token.flatten(), spec, where)
    out = np.full((len(lengths), slots), pad, dtype=spec.np_dtype)
    out[np.arange(slots) < lengths[:, None]] = values  # row-major, as the values are stored
    return out, lengths


class ParquetShard:
    """Reads one Parquet shard: whole, by row group, or a range of sequences."""

    def __init__(self, source, fields: dict[str, FieldSpec], where: str):
        # `source` is a local path or an open binary file from fsspec.
        self.fields = fields
        self.stored = {n: s for n, s in stored_fields(fields).items() if s.per != "shard"}  # read per row group
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
        # Columns the direct page path may read: local files, fixed-width token fields whose Arrow type is
        # the one the spec names (the leaf column then holds their values in order).
        self.path = source if isinstance(source, str) else None
        self.direct: dict[str, int] = {}
        if self.path is not None:
            schema = self.file.schema_arrow
            leaves = {meta.schema.column(c).path.split(".")[0]: c for c in range(meta.num_columns)}
            for name, spec in self.stored.items():
                # (1.1 sample columns are ragged, so only a 1.0 shard's padded ones match here)
                if (spec.per == "token" and spec.shape and name in leaves and name in schema.names
                        and schema.field(name).type == arrow_type(spec, "" if name in RAGGED else name)):
                    self.direct[name] = leaves[name]
        self._data = None
        self.table = shard_table(self._shard_arrays(fields), fields, where)

    def _shard_arrays(self, fields: dict[str, FieldSpec]) -> dict[str, np.ndarray]:
        """The shard arrays (a compact top-k's rank table): the first row of row group 0; every other row empty."""
        out = {}
        for name, spec in stored_fields(fields).items():
            if spec.per != "shard":
                continue
            if name not in self.file.schema_arrow.names or self.file.schema_arrow.field(name).type != arrow_type(spec, name):
                raise CacheError(f"{self.where}: column {name!r} is missing or not {arrow_type(spec, name)}")
            lists = []
            for g in range(self.file.metadata.num_row_groups):
                try:
                    col = self.file.read_row_group(g, columns=[name]).column(name)
                except (pa.ArrowInvalid, OSError) as e:
                    raise CacheError(f"{self.where}: row group {g} is unreadable ({e})") from None
                lists += [c for c in col.chunks]
            arr = pa.concat_arrays(lists) if lists else pa.array([], arrow_type(spec, name))
            lengths = np.diff(arr.offsets.to_numpy())
            if arr.null_count or np.count_nonzero(lengths[1:]):
                raise CacheError(f"{self.where}: column {name!r} must hold its array in the first row only")
            out[name] = _numpy(arr.flatten(), spec, f"{self.where} column {name!r}")
        return out

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
        direct = {}
        if self.direct:
            if self._data is None:
                self._data = pa.memory_map(self.path, "r").read_buffer()  # zero-copy view of the file
            for name, col in self.direct.items():
                try:
                    direct[name] = direct_column(self._data, self.file.metadata, i, col, self.stored[name],
                                                  is_byte_plane(name))
                except (NotDirect, pa.ArrowException, IndexError, ValueError, OSError, RecursionError):
                    pass  # not the layout this path reads, or damaged: Arrow reads it (and reports damage)
        rest = [n for n in self.stored if n not in direct]
        try:
            table = self.file.read_row_group(i, columns=rest)
        except (pa.ArrowInvalid, OSError) as e:
            raise CacheError(f"{self.where}: row group {i} is unreadable ({e})") from None
        where = f"{self.where} row group {i}"
        block = _block_from_table(table, {n: self.stored[n] for n in rest}, where)
        tokens = block.num_tokens
        for name, values in direct.items():
            shape = self.stored[name].shape
            if len(values) != tokens * shape[0]:
                raise CacheError(f"{where}: column {name!r} holds {len(values)} values, expected {tokens} tokens x {shape[0]}")
            block.token[name] = values.reshape(tokens, *shape)
        if direct:  # keep the field order of the manifest, as the Arrow path does
            block.token = {n: block.token[n] for n in self.stored if n in block.token}
        return to_logical(block, self.fields, self.table, where)

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
