"""Fields, named dtypes and the columnar block of sequences that every reader and writer passes around.

Notation used in shapes: n = sequences in a block, T = tokens in a block (sum of lengths), k = top-k,
S = RS-KD sample slots, d = hidden size.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import numpy as np

from formats.errors import CacheError
from formats.topk_codec import DEFAULT_LOGPROB_BITS, CompactTopk

FORMAT_NAME = "kdcache"
FORMAT_VERSION = "1.2.0"
READABLE_MAJOR = 1

# Storage numpy dtype for each named dtype. BF16 has no numpy type: its raw bits live in uint16.
DTYPES: dict[str, np.dtype] = {
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "U8": np.dtype("u1"),
    "U16": np.dtype("<u2"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
}
LOGPROB_DTYPES = ("F32", "F16", "BF16")
TOPK_ENCODINGS = ("plain", "compact")
HIDDEN_DTYPES = ("F16", "BF16")
COUNT_DTYPES = ("U8", "U16")

# zstd level the writers use per field. RS-KD samples are most of an RS-KD cache's bytes and are compressed
# once, in the builder's background writer thread: level 9 saves ~7% of them for about half the speed of
# level 3 (benchmarks/storage.py). The parts of a compact top-k (stored names, formats/layout.py) are most of a
# compact cache: level 9 saves ~3% of them at ~200k tokens/s for k = 128; level 19 would save 5% more at ~12k.
_ZSTD_LEVELS = {"sample_ids": 9, "sample_counts": 9, "topk_ids/table": 9, "topk_logprobs/codes": 9}


def zstd_level(name: str) -> int:
    """The zstd level both backends' writers use for field (or stored part) `name`."""
    return _ZSTD_LEVELS.get(name, 9 if name.startswith("topk_ids/rank") else 3)

# Limits checked before any allocation (SPEC.md, "Limits a reader enforces").
MAX_SHARD_TOKENS = 2**31
MAX_SHARD_SEQUENCES = 2**26
MAX_K = 2**16
MAX_HIDDEN = 2**17
MAX_VOCAB = 2**31 - 1


@dataclass(frozen=True)
class FieldSpec:
    """One array of the cache: `per` token or sequence, a named dtype, a fixed trailing shape; the top-k fields
    may name a compact `encoding` (format 1.2). The arrays a shard stores (formats/layout.py) are described the
    same way, and there `per` may also be "shard": one 1-D array for the whole shard."""

    per: str  # "token" | "sequence" (| "shard" for stored parts only)
    dtype: str  # a key of DTYPES
    shape: tuple[int, ...] = ()
    encoding: CompactTopk | None = None  # None: stored as the array itself

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    def to_json(self) -> dict:
        out = {"per": self.per, "dtype": self.dtype, "shape": list(self.shape)}
        if self.encoding is not None:
            out["encoding"] = self.encoding.to_json()
        return out

    @staticmethod
    def from_json(name: str, obj: object) -> "FieldSpec":
        if not isinstance(obj, dict) or set(obj) - {"encoding"} != {"per", "dtype", "shape"}:
            raise CacheError(f"manifest field {name!r}: expected keys per, dtype, shape (and encoding), got {obj!r:.300}")
        per, dtype, shape = obj["per"], obj["dtype"], obj["shape"]
        if per not in ("token", "sequence"):
            raise CacheError(f"manifest field {name!r}: per must be 'token' or 'sequence', got {per!r}")
        if dtype not in DTYPES:
            raise CacheError(f"manifest field {name!r}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
            raise CacheError(f"manifest field {name!r}: shape must be a list of ints, got {shape!r}")
        if len(shape) > 1 or any(s < 1 or s > max(MAX_K, MAX_HIDDEN) for s in shape):
            raise CacheError(f"manifest field {name!r}: shape {shape} out of range")
        encoding = CompactTopk.from_json(name, obj["encoding"]) if "encoding" in obj else None
        return FieldSpec(per, dtype, tuple(shape), encoding)


def make_fields(
    top_k: int,
    logprob_dtype: str = "F32",
    sample_slots: int = 0,
    count_dtype: str = "U8",
    hidden: dict[int, tuple[int, str]] | None = None,
    loss_mask: bool = False,
    position_ids: bool = False,
    byte_offsets: bool = False,
    topk_encoding: str = "plain",
    logprob_bits: int = DEFAULT_LOGPROB_BITS,
    vocab_size: int | None = None,
) -> dict[str, FieldSpec]:
    """The field table of a cache with these options; `hidden` maps layer index -> (hidden size, dtype).

    `top_k` 0 makes a samples-only (RS-KD) cache: no top-k fields, so it needs `sample_slots`.
    `topk_encoding` "compact" stores the top-k in `logprob_bits`-bit codes (SPEC.md, "Compact top-k"); the
    writer then takes float32 log-probs (`logprob_dtype` F32) and needs the tokenizer's `vocab_size`."""
    if not 0 <= top_k <= MAX_K:
        raise CacheError(f"top_k must be in [0, {MAX_K}], got {top_k}")
    if top_k == 0 and not sample_slots:
        raise CacheError("top_k 0 stores no teacher distribution unless RS-KD samples are kept (sample draws > 0)")
    if logprob_dtype not in LOGPROB_DTYPES:
        raise CacheError(f"logprob dtype must be one of {LOGPROB_DTYPES}, got {logprob_dtype!r}")
    if topk_encoding not in TOPK_ENCODINGS:
        raise CacheError(f"top-k encoding must be one of {TOPK_ENCODINGS}, got {topk_encoding!r}")
    fields = {"input_ids": FieldSpec("token", "I32")}
    if top_k:
        fields["topk_ids"] = FieldSpec("token", "I32", (top_k,))
        fields["topk_logprobs"] = FieldSpec("token", logprob_dtype, (top_k,))
    if topk_encoding == "compact":
        if top_k < 2:
            raise CacheError(f"compact top-k needs top_k >= 2 (the top-1 is stored apart), got {top_k}")
        if logprob_dtype != "F32":
            raise CacheError(f"compact top-k quantizes float32 log-probs: capture them as F32, not {logprob_dtype}")
        if vocab_size is None:
            raise CacheError("compact top-k needs the vocabulary size (its rank bytes depend on it)")
        fields = with_topk_encoding(fields, CompactTopk.make(logprob_bits, vocab_size))
    fields.update(tail_logmass=FieldSpec("token", "F32"), target_logprob=FieldSpec("token", "F32"),
                  doc_index=FieldSpec("sequence", "I64"))
    if loss_mask:
        fields["loss_mask"] = FieldSpec("token", "U8")
    if position_ids:
        fields["position_ids"] = FieldSpec("token", "I32")
    if byte_offsets:
        fields["byte_offsets"] = FieldSpec("token", "I32", (2,))
    if sample_slots:
        if count_dtype not in COUNT_DTYPES:
            raise CacheError(f"sample count dtype must be one of {COUNT_DTYPES}, got {count_dtype!r}")
        fields["sample_ids"] = FieldSpec("token", "I32", (sample_slots,))
        fields["sample_counts"] = FieldSpec("token", count_dtype, (sample_slots,))
    for layer, (size, dtype) in sorted((hidden or {}).items()):
        if layer < 0:
            raise CacheError(f"hidden layer indices are stored non-negative, got {layer}")
        if dtype not in HIDDEN_DTYPES:
            raise CacheError(f"hidden dtype must be one of {HIDDEN_DTYPES}, got {dtype!r}")
        fields[f"hidden/{layer}"] = FieldSpec("token", dtype, (size,))
    return fields


def with_topk_encoding(fields: dict[str, FieldSpec], encoding: CompactTopk | None) -> dict[str, FieldSpec]:
    """The field table with its top-k fields stored with `encoding` (None: plain); a compact top-k is F32."""
    out = dict(fields)
    if "topk_ids" in out:
        out["topk_ids"] = dataclasses.replace(out["topk_ids"], encoding=encoding)
        dtype = "F32" if encoding is not None else out["topk_logprobs"].dtype
        out["topk_logprobs"] = dataclasses.replace(out["topk_logprobs"], dtype=dtype, encoding=encoding)
    return out


def topk_encoding_of(fields: dict[str, FieldSpec]) -> CompactTopk | None:
    """The compact encoding of a field table's top-k, None when it is plain (or absent)."""
    return fields["topk_ids"].encoding if "topk_ids" in fields else None


REQUIRED_FIELDS = ("input_ids", "tail_logmass", "target_logprob", "doc_index")
TOPK_FIELDS = ("topk_ids", "topk_logprobs")  # required unless the cache is samples-only (k = 0)
OPTIONAL_FIELDS = ("loss_mask", "position_ids", "byte_offsets", "sample_ids", "sample_counts")


def top_k_of(fields: dict[str, FieldSpec]) -> int:
    """The k of a field table; 0 for a samples-only cache, which has no top-k fields."""
    return fields["topk_ids"].shape[0] if "topk_ids" in fields else 0


def check_field_table(fields: dict[str, FieldSpec]) -> None:
    """Refuse a field table this version does not define (SPEC.md, Fields)."""
    expected = make_fields(1)
    samples_only = not any(name in fields for name in TOPK_FIELDS) and "sample_ids" in fields
    for name in REQUIRED_FIELDS + (() if samples_only else TOPK_FIELDS):
        if name not in fields:
            raise CacheError(f"manifest fields: required field {name!r} is missing")
    for name in REQUIRED_FIELDS:
        if fields[name] != expected[name]:
            raise CacheError(f"manifest field {name!r}: {fields[name].to_json()} does not match the spec")
    if not samples_only:
        for name in TOPK_FIELDS:
            got = fields[name]
            ok = got.per == "token" and len(got.shape) == 1
            if not (ok and (got.dtype == "I32" if name == "topk_ids" else got.dtype in LOGPROB_DTYPES)):
                raise CacheError(f"manifest field {name!r}: {got.to_json()} does not match the spec")
        if fields["topk_ids"].shape != fields["topk_logprobs"].shape:
            raise CacheError("manifest fields: topk_ids and topk_logprobs have different k")
        if fields["topk_ids"].shape[0] > MAX_K:
            raise CacheError(f"manifest field 'topk_ids': k = {fields['topk_ids'].shape[0]} is above the limit {MAX_K}")
        encoding = fields["topk_ids"].encoding
        if fields["topk_logprobs"].encoding != encoding:
            raise CacheError("manifest fields: topk_ids and topk_logprobs must carry the same encoding")
        if encoding is not None and (fields["topk_logprobs"].dtype != "F32" or fields["topk_ids"].shape[0] < 2):
            raise CacheError("manifest field 'topk_logprobs': a compact top-k is F32 with k >= 2")
    if ("sample_ids" in fields) != ("sample_counts" in fields):
        raise CacheError("manifest fields: sample_ids and sample_counts come together")
    if "sample_ids" in fields:
        ids, counts = fields["sample_ids"], fields["sample_counts"]
        if (ids.per, counts.per) != ("token", "token") or ids.dtype != "I32" or counts.dtype not in COUNT_DTYPES \
                or ids.shape != counts.shape or len(ids.shape) != 1:
            raise CacheError("manifest fields: sample_ids must be I32 [S] and sample_counts U8/U16 [S]")
        if ids.shape[0] > MAX_K:
            raise CacheError(f"manifest field 'sample_ids': S = {ids.shape[0]} is above the limit {MAX_K}")
    fixed = {"loss_mask": FieldSpec("token", "U8"), "position_ids": FieldSpec("token", "I32"),
             "byte_offsets": FieldSpec("token", "I32", (2,))}
    for name, spec in fields.items():
        if spec.encoding is not None and name not in TOPK_FIELDS:
            raise CacheError(f"manifest field {name!r}: only the top-k fields may name an encoding")
        if name in REQUIRED_FIELDS or name in TOPK_FIELDS or name in ("sample_ids", "sample_counts"):
            continue
        if name in fixed:
            if spec != fixed[name]:
                raise CacheError(f"manifest field {name!r}: {spec.to_json()} does not match the spec")
        elif name.startswith("hidden/") and name[7:].isdigit():
            if spec.per != "token" or spec.dtype not in HIDDEN_DTYPES or len(spec.shape) != 1:
                raise CacheError(f"manifest field {name!r}: hidden states are token F16/BF16 [d]")
        else:
            raise CacheError(f"manifest field {name!r} is not defined by format {FORMAT_VERSION}")


@dataclass
class SeqBlock:
    """Consecutive sequences in columnar form, as one shard (or part of one) holds them.

    `offsets` (n + 1,) int64 cuts the flat token axis: sequence j is rows offsets[j]:offsets[j+1] of
    every array in `token`; `sequence` arrays have one row per sequence.
    """

    offsets: np.ndarray  # (n + 1,) int64
    token: dict[str, np.ndarray] = field(default_factory=dict)  # each (T, *shape)
    sequence: dict[str, np.ndarray] = field(default_factory=dict)  # each (n, *shape)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1] - self.offsets[0])

    def get(self, j: int) -> dict[str, np.ndarray]:
        """Sequence j as a dict of arrays (views, no copies)."""
        start, end = int(self.offsets[j]), int(self.offsets[j + 1])
        out = {name: arr[start:end] for name, arr in self.token.items()}
        out.update({name: arr[j] for name, arr in self.sequence.items()})
        return out

    def slice(self, start: int, stop: int) -> "SeqBlock":
        """Sequences start:stop as a block of their own (offsets rebased to 0; arrays are views)."""
        lo, hi = int(self.offsets[start]), int(self.offsets[stop])
        return SeqBlock(
            offsets=self.offsets[start : stop + 1] - lo,
            token={name: arr[lo:hi] for name, arr in self.token.items()},
            sequence={name: arr[start:stop] for name, arr in self.sequence.items()},
        )

    @staticmethod
    def from_sequences(seqs: list[dict[str, np.ndarray]], fields: dict[str, FieldSpec]) -> "SeqBlock":
        """Stack per-sequence dicts (token arrays (T_j, *shape), sequence values) into one block."""
        lengths = [len(s["input_ids"]) for s in seqs]
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        block = SeqBlock(offsets=offsets)
        for name, spec in fields.items():
            missing = [j for j, s in enumerate(seqs) if name not in s]
            if missing:
                raise CacheError(f"sequence {missing[0]} of the block lacks field {name!r}")
            if spec.per == "token":
                parts = [np.asarray(s[name]).reshape((-1, *spec.shape)) for s in seqs]
                arr = np.concatenate(parts) if parts else np.zeros((0, *spec.shape))
                block.token[name] = np.ascontiguousarray(arr, dtype=spec.np_dtype)
            else:
                arr = np.asarray([s[name] for s in seqs]).reshape((len(seqs), *spec.shape))
                block.sequence[name] = np.ascontiguousarray(arr, dtype=spec.np_dtype)
        extra = set().union(*(s.keys() for s in seqs)) - set(fields) if seqs else set()
        if extra:
            raise CacheError(f"sequence has fields the cache does not declare: {sorted(extra)}")
        return block

    @staticmethod
    def concat(blocks: list["SeqBlock"], fields: dict[str, FieldSpec]) -> "SeqBlock":
        """Join blocks in order (copies)."""
        offsets = [np.zeros(1, dtype=np.int64)]
        base = 0
        for b in blocks:
            offsets.append(b.offsets[1:] - b.offsets[0] + base)
            base += b.num_tokens
        out = SeqBlock(offsets=np.concatenate(offsets))
        for name, spec in fields.items():
            target = out.token if spec.per == "token" else out.sequence
            parts = [(b.token if spec.per == "token" else b.sequence)[name] for b in blocks]
            target[name] = np.concatenate(parts) if parts else np.zeros((0, *spec.shape), dtype=spec.np_dtype)
        return out


def check_block(block: SeqBlock, fields: dict[str, FieldSpec], where: str) -> None:
    """Shapes and dtypes of a block against the field table; `where` names the shard for errors."""
    n, t = len(block), block.num_tokens
    if block.offsets.dtype != np.int64 or block.offsets.ndim != 1 or len(block.offsets) < 1:
        raise CacheError(f"{where}: seq_offsets must be a 1-D int64 array")
    if block.offsets[0] != 0 or np.any(np.diff(block.offsets) < 0):
        raise CacheError(f"{where}: seq_offsets must start at 0 and never decrease")
    for name, spec in fields.items():
        arr = (block.token if spec.per == "token" else block.sequence).get(name)
        if arr is None:
            raise CacheError(f"{where}: field {name!r} is missing")
        rows = t if spec.per == "token" else n
        if arr.shape != (rows, *spec.shape):
            raise CacheError(f"{where}: field {name!r} has shape {arr.shape}, expected {(rows, *spec.shape)}")
        if arr.dtype != spec.np_dtype:
            raise CacheError(f"{where}: field {name!r} has dtype {arr.dtype}, expected {spec.dtype}")
    extra = (set(block.token) | set(block.sequence)) - set(fields)
    if extra:
        raise CacheError(f"{where}: undeclared fields {sorted(extra)}")


def content_sha256(block: SeqBlock, fields: dict[str, FieldSpec]) -> str:
    """The backend-independent checksum of a block's logical arrays (SPEC.md, Content checksum)."""
    h = hashlib.sha256()
    h.update(b"seq_offsets\tI64\n")
    h.update(np.ascontiguousarray(block.offsets - block.offsets[0], dtype="<i8").tobytes())
    for name in sorted(fields):
        spec = fields[name]
        arr = (block.token if spec.per == "token" else block.sequence)[name]
        h.update(f"{name}\t{spec.dtype}\t{','.join(map(str, spec.shape))}\n".encode())
        h.update(np.ascontiguousarray(arr, dtype=spec.np_dtype).tobytes())
    return h.hexdigest()


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """BF16 raw bits (uint16) -> float32 values."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> BF16 raw bits (uint16), round to nearest even; NaN stays NaN."""
    x = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = x + (np.uint32(0x7FFF) + ((x >> 16) & np.uint32(1)))
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def to_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values of a float field (F32/F16/BF16) as float32."""
    return bf16_to_f32(arr) if dtype == "BF16" else arr.astype(np.float32, copy=False)


def from_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> the storage array of a float field."""
    return f32_to_bf16(values) if dtype == "BF16" else np.asarray(values, dtype=DTYPES[dtype])
