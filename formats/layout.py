"""The arrays a shard stores for a field table, and the block of logical fields they stand for.

A plain field is stored as itself. A compact top-k (SPEC.md, "Compact top-k") is stored as its parts, named
`<field>/<part>`; one of them, the rank table, belongs to the whole shard (`per` "shard"). Both backends write
and read these stored arrays; this module turns a block of logical fields into them and back, so the backends
never see an encoding and every reader returns the same logical arrays.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from formats.schema import FieldSpec, SeqBlock, to_float32, topk_encoding_of
from formats.topk_codec import decode_table, decode_topk, encode_topk

TABLE = "topk_ids/table"


def stored_fields(fields: dict[str, FieldSpec]) -> dict[str, FieldSpec]:
    """Stored name -> spec of every array a shard holds for `fields`, in field order."""
    enc = topk_encoding_of(fields)
    if enc is None:
        return fields
    out = {}
    for name, spec in fields.items():
        if name == "topk_ids":
            m = spec.shape[0] - 1
            out["topk_ids/top1"] = FieldSpec("token", "I32")
            out.update({f"topk_ids/rank{b}": FieldSpec("token", "U8", (m,)) for b in range(enc.rank_bytes)})
            out[TABLE] = FieldSpec("shard", "I32")
        elif name == "topk_logprobs":
            out["topk_logprobs/top1"] = FieldSpec("token", "F32")
            out["topk_logprobs/codes"] = FieldSpec("token", "U8", (spec.shape[0] - 1,))
        else:
            out[name] = spec
    return out


def is_byte_plane(name: str) -> bool:
    """Stored arrays whose U8 rows are opaque bytes (Parquet stores each row as one fixed-size binary value)."""
    return name.startswith("topk_ids/rank") or name == "topk_logprobs/codes"


def to_stored(block: SeqBlock, fields: dict[str, FieldSpec]) -> tuple[SeqBlock, dict[str, np.ndarray], SeqBlock]:
    """(stored token and sequence arrays, stored shard arrays, the logical block that reading them gives back).

    The last is `block` itself for a plain field table; with a compact top-k it holds the decoded top-k, which is
    what the shard's content checksum covers."""
    enc = topk_encoding_of(fields)
    if enc is None:
        return block, {}, block
    ids = block.token["topk_ids"]
    parts = encode_topk(ids, to_float32(block.token["topk_logprobs"], fields["topk_logprobs"].dtype), enc)
    token = {}
    for name in fields:
        if name == "topk_ids":
            token["topk_ids/top1"] = parts.top1_id
            token.update({f"topk_ids/rank{b}": plane for b, plane in enumerate(parts.rank_planes)})
        elif name == "topk_logprobs":
            token["topk_logprobs/top1"] = parts.top1_logprob
            token["topk_logprobs/codes"] = parts.codes
        elif fields[name].per == "token":
            token[name] = block.token[name]
    stored = SeqBlock(offsets=block.offsets, token=token, sequence=dict(block.sequence))
    logical = to_logical(stored, fields, decode_table(parts.table_diff, enc, "compact top-k"), "compact top-k")
    return stored, {TABLE: parts.table_diff}, logical


def shard_table(shard_arrays: dict[str, np.ndarray], fields: dict[str, FieldSpec], where: str) -> np.ndarray | None:
    """The decoded rank table of a shard with a compact top-k (read once per shard), else None."""
    enc = topk_encoding_of(fields)
    return None if enc is None else decode_table(shard_arrays[TABLE], enc, where)


def to_logical(stored: SeqBlock, fields: dict[str, FieldSpec], table: np.ndarray | None, where: str) -> SeqBlock:
    """The logical block of `fields` from a block of stored arrays (`table` from `shard_table`)."""
    enc = topk_encoding_of(fields)
    if enc is None:
        return stored
    tok = stored.token
    ids, lp = decode_topk(tok["topk_ids/top1"], tok["topk_logprobs/top1"],
                          [tok[f"topk_ids/rank{b}"] for b in range(enc.rank_bytes)], tok["topk_logprobs/codes"],
                          table, enc, where)
    token = {}
    for name, spec in fields.items():
        if name == "topk_ids":
            token[name] = ids
        elif name == "topk_logprobs":
            token[name] = lp
        elif spec.per == "token":
            token[name] = tok[name]
    return dataclasses.replace(stored, token=token)
