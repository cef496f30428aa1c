"""Direct page reads of Parquet shards: Thrift page headers, zstd, level runs skipped, values viewed.

Arrow decodes a `list<fixed_size_list<T, n>>` column value by value through repetition and definition
levels: about 0.1-0.2 GB/s here, 3-5x slower than the zstd underneath (benchmarks/loader.py; FACTS.md saw
the same). kdcache's writer makes these columns one way only (data pages v1, PLAIN values, no nulls), so
for them the pages are read directly: page header, zstd, skip the two level runs, view the values. Any
page that is not exactly that, and any error, sends the column back to Arrow, which has the last word.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from formats.schema import FieldSpec


class NotDirect(Exception):
    """This column chunk is not in the layout the direct path reads; Arrow reads it."""


def _varint(buf, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, pos
        shift += 7


def _thrift_skip(buf, pos: int, ttype: int) -> int:
    """Skip one Thrift compact-protocol value of type `ttype` at `pos`."""
    if ttype in (1, 2):  # booleans live in the field header
        return pos
    if ttype == 3:
        return pos + 1
    if ttype in (4, 5, 6):
        return _varint(buf, pos)[1]
    if ttype == 7:
        return pos + 8
    if ttype == 8:
        n, pos = _varint(buf, pos)
        return pos + n
    if ttype in (9, 10):
        head = buf[pos]
        size, etype = head >> 4, head & 0x0F
        pos += 1
        if size == 15:
            size, pos = _varint(buf, pos)
        for _ in range(size):
            pos = _thrift_skip(buf, pos, etype)
        return pos
    if ttype == 12:
        return thrift_struct(buf, pos, 8)[1]  # skipped structs: no deeper nesting is needed
    raise NotDirect(f"thrift type {ttype}")


def thrift_struct(buf, pos: int, depth: int = 0) -> tuple[dict[int, object], int]:
    """A Thrift compact struct at `pos`: {field id: int value or nested struct dict} (other types skipped)."""
    if depth > 8:  # page headers nest 2 deep; a crafted file must not exhaust the stack
        raise NotDirect("thrift nesting")
    got: dict[int, object] = {}
    last = 0
    while True:
        head = buf[pos]
        pos += 1
        if head == 0:
            return got, pos
        delta, ttype = head >> 4, head & 0x0F
        if delta:
            fid = last + delta
        else:
            raw, pos = _varint(buf, pos)
            fid = (raw >> 1) ^ -(raw & 1)
        last = fid
        if ttype in (4, 5, 6):
            raw, pos = _varint(buf, pos)
            got[fid] = (raw >> 1) ^ -(raw & 1)
        elif ttype == 12:
            got[fid], pos = thrift_struct(buf, pos, depth + 1)
        else:
            pos = _thrift_skip(buf, pos, ttype)


def column_pages(buf, start: int, length: int) -> list[dict]:
    """Headers of the pages of one column chunk: {type, uncompressed, compressed, body (offset), header}."""
    pages, pos, end = [], start, start + length
    while pos < end:
        head, body = thrift_struct(buf, pos)
        pages.append({"type": head.get(1), "uncompressed": head.get(2), "compressed": head.get(3), "body": body,
                      "header": head})
        pos = body + head.get(3, 0)
    if pos != end:
        raise NotDirect("pages overrun the column chunk")
    return pages


# Parquet physical storage of each named dtype as written by Arrow: (physical type, bytes per value).
_PHYSICAL = {"I32": ("INT32", 4), "I64": ("INT64", 8), "U8": ("INT32", 4), "U16": ("INT32", 4), "BF16": ("INT32", 4),
             "F32": ("FLOAT", 4), "F16": ("FIXED_LEN_BYTE_ARRAY", 2)}
_PLAIN_DTYPE = {"INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"), "FLOAT": np.dtype("<f4"),
                "FIXED_LEN_BYTE_ARRAY": np.dtype("<f2")}


def direct_column(data: pa.Buffer, meta, group: int, col: int, spec: FieldSpec, plane: bool = False) -> np.ndarray:
    """The values of one list<fixed_size_list> column chunk, straight from its pages (see above); with `plane`,
    of a list<fixed_size_binary(m)> byte plane (one m-byte value per token, returned as m uint8 values each)."""
    chunk = meta.row_group(group).column(col)
    column = meta.schema.column(col)
    physical, size = ("FIXED_LEN_BYTE_ARRAY", spec.shape[0]) if plane else _PHYSICAL[spec.dtype]
    if column.physical_type != physical or chunk.compression not in ("ZSTD", "UNCOMPRESSED") or \
            chunk.dictionary_page_offset is not None or not set(chunk.encodings) <= {"PLAIN", "RLE"}:
        raise NotDirect("column layout")
    codec = pa.Codec("zstd") if chunk.compression == "ZSTD" else None
    # An untrusted file's page header may claim any decompressed size: never allocate more than the chunk's
    # values (plus their level runs, at most a few bytes per value) can take.
    budget = chunk.num_values * (size + 4) + 1024
    parts = []
    for page in column_pages(memoryview(data).cast("B"), chunk.data_page_offset, chunk.total_compressed_size):
        dph = page["header"].get(5)
        if page["type"] != 0 or not isinstance(dph, dict) or dph.get(2) != 0:  # DATA_PAGE v1, PLAIN values
            raise NotDirect("page type or encoding")
        if not isinstance(page["uncompressed"], int) or not 0 <= page["uncompressed"] <= budget:
            raise NotDirect("page size")
        budget -= page["uncompressed"]
        raw = data[page["body"] : page["body"] + page["compressed"]]
        body = codec.decompress(raw, decompressed_size=page["uncompressed"]) if codec else raw
        view = memoryview(body)
        pos = 0
        for levels in (column.max_repetition_level, column.max_definition_level):
            if levels:  # v1 level runs: a 4-byte little-endian length, then the RLE/bit-packed run
                pos += 4 + int.from_bytes(view[pos : pos + 4], "little")
        n = dph[1]
        if len(view) - pos != n * size:  # nulls or empty lists would leave fewer values than levels
            raise NotDirect("value count")
        parts.append(np.frombuffer(view, np.uint8 if plane else _PLAIN_DTYPE[physical], count=n * size if plane else n,
                                   offset=pos))
    values = np.concatenate(parts) if len(parts) != 1 else parts[0]
    return values if values.dtype == spec.np_dtype else values.astype(spec.np_dtype) if spec.dtype in ("U8", "U16", "BF16") \
        else values.view(spec.np_dtype)
