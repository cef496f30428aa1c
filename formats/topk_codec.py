"""Compact top-k: a block's `topk_ids` and `topk_logprobs` as byte planes and back (SPEC.md, "Compact top-k").

Notation: T = positions, k = top-k, m = k - 1 (the entries after the top-1), L = 2^B codebook entries,
n = ids in a shard's rank table.

The top-1 id and log-prob of each position are stored exactly. The other m ids become ranks in a per-shard
table (ids ordered by how many rows hold them, so common ids get small ranks); each row's ranks are sorted
and stored as differences split into little-endian byte planes, which zstd then packs (most high bytes are
0). Their log-probs become B-bit codes into a codebook uniform in g(p) = sqrt(p) + beta * ln(p): a step in
sqrt(p) costs about the same KL at every p, and the log term keeps some resolution for the smallest entries.
The measurements behind these choices: benchmarks/RESULTS.md, "Storage size and fidelity" (how the encoding
was chosen).

Decoding is a cumulative sum, two gathers and one sort per row, all numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from formats.errors import CacheError

ENCODING_NAME = "compact"
DEFAULT_LOGPROB_BITS = 6
MIN_LOGPROB_BITS, MAX_LOGPROB_BITS = 2, 8
MAX_RANK_BYTES = 4
SOURCE_DTYPES = ("F32", "F16", "BF16")
# The codebook kdcache writes: L values uniform in g between FLOOR and CODEBOOK_TOP (SPEC.md). FLOOR is below
# 1 / (largest vocabulary the format allows), so a top-1 always has a code below it; no entry after the top-1
# can hold more than half the mass.
FLOOR = 2.0**-32
CODEBOOK_TOP = 0.5
BETA = 2.0**-11
_PASSES = 4  # of the mass-keeping rounding in `quantize`: each tries the moves the previous one could not fit
_DECODE_ROWS = 512  # rows decoded at a time (see decode_topk)
_ENCODE_ROWS = 1024  # rows encoded at a time (see encode_topk)


@dataclass(frozen=True)
class CompactTopk:
    """The encoding object both top-k fields carry in the manifest (SPEC.md, "Compact top-k")."""

    logprob_bits: int  # B: codes are B-bit, 0 .. 2^B - 1
    rank_bytes: int  # byte planes of the rank differences: enough bytes for vocab_size - 1
    codebook: tuple[float, ...]  # 2^B float32 log-probabilities, strictly increasing, all < 0
    source_dtype: str = "F32"  # dtype of the log-probs that were quantized; the top-1 is exactly one of them

    def to_json(self) -> dict:
        return {"name": ENCODING_NAME, "logprob_bits": self.logprob_bits, "rank_bytes": self.rank_bytes,
                "source_dtype": self.source_dtype, "codebook": list(self.codebook)}

    @staticmethod
    def from_json(name: str, obj: object) -> "CompactTopk":
        where = f"manifest field {name!r} encoding"
        keys = {"name", "logprob_bits", "rank_bytes", "source_dtype", "codebook"}
        if not isinstance(obj, dict) or set(obj) != keys:
            raise CacheError(f"{where}: expected an object with keys {', '.join(sorted(keys))}, got {obj!r:.200}")
        if obj["name"] != ENCODING_NAME:
            raise CacheError(f"{where}: unknown encoding {obj['name']!r} (this version knows {ENCODING_NAME!r})")
        bits, nbytes, source, book = obj["logprob_bits"], obj["rank_bytes"], obj["source_dtype"], obj["codebook"]
        if not _is_int(bits) or not MIN_LOGPROB_BITS <= bits <= MAX_LOGPROB_BITS:
            raise CacheError(f"{where}: logprob_bits must be an integer in [{MIN_LOGPROB_BITS}, {MAX_LOGPROB_BITS}], got {bits!r}")
        if not _is_int(nbytes) or not 1 <= nbytes <= MAX_RANK_BYTES:
            raise CacheError(f"{where}: rank_bytes must be an integer in [1, {MAX_RANK_BYTES}], got {nbytes!r}")
        if source not in SOURCE_DTYPES:
            raise CacheError(f"{where}: source_dtype must be one of {SOURCE_DTYPES}, got {source!r}")
        if not isinstance(book, list) or len(book) != 1 << bits or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in book):
            raise CacheError(f"{where}: codebook must be a list of {1 << bits} numbers")
        values = np.asarray(book, dtype=np.float64)
        if not (np.isfinite(values).all() and (values < 0).all() and (np.diff(values) > 0).all()
                and (values.astype(np.float32) == values).all()):
            raise CacheError(f"{where}: codebook values must be float32 log-probabilities below 0, strictly increasing")
        return CompactTopk(bits, nbytes, tuple(float(v) for v in values), source)

    @staticmethod
    def make(logprob_bits: int, vocab_size: int, source_dtype: str = "F32") -> "CompactTopk":
        """kdcache's encoding for a vocabulary: `logprob_bits` per code, the codebook of `make_codebook`."""
        if not _is_int(logprob_bits) or not MIN_LOGPROB_BITS <= logprob_bits <= MAX_LOGPROB_BITS:
            raise CacheError(f"logprob bits must be in [{MIN_LOGPROB_BITS}, {MAX_LOGPROB_BITS}], got {logprob_bits!r}")
        if source_dtype not in SOURCE_DTYPES:
            raise CacheError(f"compact top-k quantizes {'/'.join(SOURCE_DTYPES)} log-probs, got {source_dtype!r}")
        nbytes = max(1, ((int(vocab_size) - 1).bit_length() + 7) // 8)
        return CompactTopk(logprob_bits, nbytes, make_codebook(logprob_bits), source_dtype)

    @property
    def values(self) -> np.ndarray:
        """(L,) float32: the log-probability each code stands for."""
        return np.asarray(self.codebook, dtype=np.float32)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def make_codebook(bits: int) -> tuple[float, ...]:
    """2^bits float32 log-probabilities ln(v_c), v_c = g^-1(g(FLOOR) + c * (g(CODEBOOK_TOP) - g(FLOOR)) / (L - 1)),
    g(p) = sqrt(p) + BETA * ln(p), solved by bisection in float64 on ln p (g increases on (0, 1])."""
    n = 1 << bits

    def g(x: np.ndarray) -> np.ndarray:  # g as a function of x = ln p
        return np.exp(x / 2) + BETA * x

    lo_x, hi_x = np.log(FLOOR), np.log(CODEBOOK_TOP)
    target = g(np.float64(lo_x)) + (g(np.float64(hi_x)) - g(np.float64(lo_x))) * np.arange(n) / (n - 1)
    lo, hi = np.full(n, lo_x), np.full(n, hi_x)
    for _ in range(80):
        mid = (lo + hi) / 2
        below = g(mid) < target
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    x = (lo + hi) / 2
    x[0], x[-1] = lo_x, hi_x
    return tuple(float(v) for v in x.astype(np.float32))


@dataclass
class TopkParts:
    """The stored form of one block's top-k (SPEC.md names each array)."""

    top1_id: np.ndarray  # (T,) int32
    top1_logprob: np.ndarray  # (T,) float32
    rank_planes: list[np.ndarray]  # rank_bytes arrays (T, m) uint8: byte b (little-endian) of the rank differences
    codes: np.ndarray  # (T, m) uint8, in the order of the ranks
    table_diff: np.ndarray  # (n,) int32: the shard's rank table (ids in rank order) as first differences


def rank_table(ids: np.ndarray) -> np.ndarray:
    """(n,) int32: the distinct ids of `ids` (T, m) in rank order: by floor(log2(rows holding them)) descending, then
    id ascending. Buckets instead of exact counts: the table then runs in ascending stretches, whose differences
    take a third of the bytes of an exact frequency order, and the ranks cost no more (benchmarks/RESULTS.md)."""
    top = int(ids.max()) + 1 if ids.size else 0
    counts = np.zeros(top, dtype=np.int64)
    for a in range(0, len(ids), _ENCODE_ROWS):  # bincount widens to int64: a batch at a time bounds that copy
        counts += np.bincount(ids[a : a + _ENCODE_ROWS].reshape(-1), minlength=top)
    present = np.flatnonzero(counts)
    bucket = np.frexp(counts[present].astype(np.float64))[1]  # floor(log2(count)) + 1, exact for integers
    return present[np.lexsort((present, -bucket))].astype(np.int32)


def quantize(rest: np.ndarray, top1: np.ndarray, enc: CompactTopk) -> np.ndarray:
    """Codes (T, m) uint8 for the log-probs `rest` (T, m) float32 of the entries after the top-1 `top1` (T,).

    Each entry gets one of the two codes around its probability p (v_lo <= p <= v_hi, the bound of SPEC.md), and
    never one whose value reaches the top-1's. Which of the two: starting from every entry on its lower code
    (less mass than the source), entries move up where that is cheapest in KL per unit of mass (largest
    p / logmean(v_lo, v_hi)), as long as the row's stored mass stays at most the source's. So the mass the
    rows leave to the tail is never less than the source's tail, and hardly more: a KL(p || q) that spreads
    1 - sum(q) over the other ids pays for every bit of mass moved. A row already on the codebook (a decoded
    compact cache) keeps its codes exactly.
    """
    cb = enc.values
    vals = np.exp(cb.astype(np.float64))  # (L,)
    log_vals = cb.astype(np.float64)
    p = np.exp(rest.astype(np.float64))  # (T, m)
    cmax = np.searchsorted(cb, top1, side="left") - 1  # (T,) the largest code whose value is below the top-1's
    if len(cmax) and cmax.min() < 0:
        row = int(np.argmin(cmax))
        raise CacheError(f"topk_logprobs row {row}: the top-1 log-prob {float(top1[row])} is not above the codebook's "
                         f"lowest value {float(cb[0])}")
    lo = np.minimum(np.maximum(np.searchsorted(vals, p, side="right") - 1, 0), cmax[:, None])  # (T, m)
    hi = np.where(p < vals[0], lo, np.minimum(lo + 1, cmax[:, None]))  # below the floor: code 0 is both neighbours
    step = vals[hi] - vals[lo]  # (T, m) mass added by moving up; 0 where there is no code above
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(step > 0, p * (log_vals[hi] - log_vals[lo]) / step, -np.inf)
    order = np.argsort(-gain, axis=1, kind="stable")  # (T, m) best moves first
    steps = np.take_along_axis(step, order, axis=1)
    slack = (p - vals[lo]).sum(axis=1)  # (T,) mass the row may still take; < 0 only below the floor
    moved = np.zeros(steps.shape, dtype=bool)
    for _ in range(_PASSES):  # a pass takes a prefix of the moves that fit; the next tries the smaller ones left
        fits = ~moved & (steps > 0) & (steps <= slack[:, None])
        take = fits & (np.cumsum(np.where(fits, steps, 0.0), axis=1) <= slack[:, None])
        moved |= take
        slack = slack - np.where(take, steps, 0.0).sum(axis=1)
    up = np.zeros_like(moved)
    np.put_along_axis(up, order, moved, axis=1)
    return np.where(up, hi, lo).astype(np.uint8)


def encode_topk(ids: np.ndarray, logprobs: np.ndarray, enc: CompactTopk) -> TopkParts:
    """ids (T, k) int32 most probable first and their log-probs (T, k) float32 -> the stored parts.

    Rows are encoded _ENCODE_ROWS at a time: a shard's float64 temporaries would otherwise take gigabytes."""
    t, k = ids.shape
    if k < 2:
        raise CacheError("compact top-k needs k >= 2 (the top-1 is stored apart)")
    lp = np.asarray(logprobs, dtype=np.float32)
    nan = np.isnan(lp).any(axis=1)
    if nan.any():
        raise CacheError(f"topk_logprobs row {int(np.flatnonzero(nan)[0])}: NaN cannot be quantized")
    rest = ids[:, 1:]  # (T, m)
    if rest.size and (rest.min() < 0 or rest.max() >= 256**enc.rank_bytes):
        raise CacheError(f"topk_ids: ids must be in [0, {256**enc.rank_bytes}) to be stored in {enc.rank_bytes} rank bytes")
    table = rank_table(rest)
    rank_of = np.zeros(int(table.max()) + 1 if len(table) else 0, dtype=np.int64)
    rank_of[table] = np.arange(len(table))
    planes = [np.empty((t, k - 1), dtype=np.uint8) for _ in range(enc.rank_bytes)]
    codes = np.empty((t, k - 1), dtype=np.uint8)
    for a in range(0, t, _ENCODE_ROWS):
        b = min(a + _ENCODE_ROWS, t)
        ranks = rank_of[rest[a:b]]  # (n, m)
        order = np.argsort(ranks, axis=1, kind="stable")
        codes[a:b] = np.take_along_axis(quantize(lp[a:b, 1:], lp[a:b, 0], enc), order, axis=1)
        diff = np.diff(np.take_along_axis(ranks, order, axis=1), axis=1, prepend=0)  # (n, m), >= 0
        for byte, plane in enumerate(planes):
            plane[a:b] = (diff >> (8 * byte)) & 0xFF
    return TopkParts(
        top1_id=np.ascontiguousarray(ids[:, 0], dtype=np.int32),
        top1_logprob=np.ascontiguousarray(lp[:, 0]),
        rank_planes=planes,
        codes=codes,
        table_diff=np.diff(table.astype(np.int64), prepend=0).astype(np.int32),
    )


def decode_table(table_diff: np.ndarray, enc: CompactTopk, where: str) -> np.ndarray:
    """The rank table (n,) int32 from its stored differences; refuses ids out of range or repeated."""
    table = np.cumsum(np.asarray(table_diff, dtype=np.int64))
    if len(table) and (table.min() < 0 or table.max() >= min(256**enc.rank_bytes, 2**31)):
        raise CacheError(f"{where}: the top-k rank table holds ids outside [0, {min(256**enc.rank_bytes, 2**31)})")
    if len(np.unique(table)) != len(table):
        raise CacheError(f"{where}: the top-k rank table repeats an id")
    return table.astype(np.int32)


def decode_topk(top1_id: np.ndarray, top1_logprob: np.ndarray, rank_planes: list[np.ndarray], codes: np.ndarray,
                table: np.ndarray, enc: CompactTopk, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The logical arrays: ids (T, k) int32 and log-probs (T, k) float32, the top-1 first, then the other entries by
    code descending and id ascending. `table` comes from `decode_table`.

    Rows are decoded _DECODE_ROWS at a time into buffers reused from one batch to the next: the dozen passes over
    each batch then stay in the CPU cache (about 30% faster than whole blocks at k = 64; benchmarks/RESULTS.md,
    "Loader throughput")."""
    t, m = codes.shape
    cb = enc.values
    if codes.size and int(codes.max()) >= len(cb):
        raise CacheError(f"{where}: a top-k log-prob code is {int(codes.max())}, the codebook has {len(cb)} entries")
    shift = 8 * enc.rank_bytes  # table ids are below 256^rank_bytes (decode_table), codes below 2^bits
    key_type = np.int32 if shift + enc.logprob_bits <= 31 else np.int64
    diff_type = np.uint16 if enc.rank_bytes <= 2 else np.uint32
    lookup = np.concatenate([cb[::-1], [0.0]]).astype(np.float32)  # at key >> shift = L - 1 - c: codebook[c]
    ids = np.empty((t, m + 1), dtype=np.int32)
    lp = np.empty((t, m + 1), dtype=np.float32)
    rows = max(1, min(_DECODE_ROWS, t))
    diff_buf, rank_buf = np.empty((rows, m), diff_type), np.empty((rows, m), np.int64)
    id_buf, key_buf, index_buf = np.empty((rows, m), np.int32), np.empty((rows, m + 1), key_type), np.empty((rows, m + 1), np.int64)
    for a in range(0, t, rows):
        b = min(a + rows, t)
        diff, ranks, got, key, index = diff_buf[: b - a], rank_buf[: b - a], id_buf[: b - a], key_buf[: b - a], index_buf[: b - a]
        diff[...] = rank_planes[0][a:b]
        for byte, plane in enumerate(rank_planes[1:], 1):
            diff |= plane[a:b].astype(diff_type) << (8 * byte)
        np.cumsum(diff, axis=1, out=ranks)  # (n, m) non-decreasing along each row: its last is its largest
        if int(ranks[:, -1].max()) >= len(table):
            raise CacheError(f"{where}: a top-k rank is {int(ranks[:, -1].max())}, the shard's table has {len(table)} ids")
        np.take(table, ranks, out=got, mode="clip")  # in range: checked above
        np.subtract(len(cb) - 1, codes[a:b], out=key[:, 1:], dtype=key_type)
        key[:, 1:] <<= shift
        key[:, 1:] |= got
        key[:, 0] = -1 << shift  # the top-1 sorts first
        key.sort(axis=1)  # the top-1, then code descending, then id ascending
        np.bitwise_and(key, (1 << shift) - 1, out=ids[a:b], casting="unsafe")
        np.right_shift(key, shift, out=index)
        np.take(lookup, index, out=lp[a:b])  # -1 (the top-1's place) picks the last entry, overwritten below
    ids[:, 0] = top1_id
    lp[:, 0] = top1_logprob
    return ids, lp
