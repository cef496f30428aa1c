"""`kdcache verify`: checksums, schema and every value invariant of SPEC.md, one line per problem."""

from __future__ import annotations

import hashlib
import os

import numpy as np

from formats.errors import CacheError
from formats.manifest import MANIFEST_NAME, ShardEntry
from formats.reader import Cache, open_cache
from formats.schema import SeqBlock, content_sha256, to_float32, topk_encoding_of
from formats.topk_codec import CompactTopk
from formats.writer import SHARD_DIR

# |sum(top-k probs) + tail - 1| allowed for each stored log-prob dtype (SPEC.md, Fields).
MASS_TOLERANCE = {"F32": 1e-4, "F16": 5e-3, "BF16": 3e-2}
# Relative rounding of one stored log-prob, for target_logprob vs. its top-k entry.
ROUNDING = {"F32": 1e-6, "F16": 2.0**-10, "BF16": 2.0**-7}
_OWN_FILES = {MANIFEST_NAME, "README.md", ".lock"}


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))[0])


def check_values(block: SeqBlock, cache: Cache, where: str) -> list[str]:
    """Value invariants of one shard's arrays; each problem names the shard, field and a token row."""
    m = cache.manifest
    vocab, problems = m.vocab_size, []
    tok = block.token

    def bad(field: str, mask: np.ndarray, what: str) -> None:
        if mask.any():
            problems.append(f"{where} field {field}: {what} ({int(mask.reshape(len(mask), -1).any(axis=1).sum())} rows, first at token {_first(mask)})")

    lengths = np.diff(block.offsets)
    if (lengths < 1).any():
        problems.append(f"{where}: sequence {int(np.flatnonzero(lengths < 1)[0])} is empty")
    last = np.zeros(block.num_tokens, dtype=bool)
    last[block.offsets[1:][lengths > 0] - 1] = True

    bad("input_ids", (tok["input_ids"] < 0) | (tok["input_ids"] >= vocab), f"ids outside [0, {vocab})")
    # A samples-only cache (k = 0) checks as an empty top-k: its tail must then hold all the mass.
    ids = tok["topk_ids"] if "topk_ids" in tok else np.zeros((block.num_tokens, 0), dtype=np.int32)
    bad("topk_ids", (ids < 0) | (ids >= vocab), f"ids outside [0, {vocab})")
    if ids.shape[1] > 1:
        srt = np.sort(ids, axis=1)
        bad("topk_ids", srt[:, 1:] == srt[:, :-1], "repeated id in one row")

    enc = topk_encoding_of(m.fields)
    # A compact top-k holds F32 values of a quantized source: its rounding is the source's.
    lp_dtype = enc.source_dtype if enc else m.fields["topk_logprobs"].dtype if "topk_logprobs" in m.fields else "F32"
    lp = to_float32(tok["topk_logprobs"], m.fields["topk_logprobs"].dtype) if "topk_logprobs" in tok \
        else np.zeros(ids.shape, np.float32)
    bad("topk_logprobs", np.isnan(lp), "NaN")
    bad("topk_logprobs", lp > 0, "log-prob above 0")
    bad("topk_logprobs", lp[:, 1:] > lp[:, :-1], "not non-increasing along k")
    tail = tok["tail_logmass"]
    bad("tail_logmass", np.isnan(tail) | (tail > 0), "NaN or above 0")
    if enc is None:
        with np.errstate(over="ignore", invalid="ignore"):
            mass = np.exp(lp.astype(np.float64)).sum(axis=1) + np.exp(tail.astype(np.float64))
        bad("tail_logmass", ~(np.abs(mass - 1.0) <= MASS_TOLERANCE[lp_dtype]),
            f"top-k mass + tail differs from 1 by more than {MASS_TOLERANCE[lp_dtype]}")

    target = tok["target_logprob"]
    bad("target_logprob", ~np.isnan(target) & last, "not NaN at the last position of a sequence")
    bad("target_logprob", np.isnan(target) & ~last, "NaN before the last position")
    bad("target_logprob", target > 0, "log-prob above 0")
    # Where the next token is in the top k, its target log-prob must be that entry's.
    nxt = np.append(tok["input_ids"][1:], -1)
    hit = (ids == nxt[:, None]) & ~last[:, None]
    if enc is not None:  # only the top-1 is stored as it was; the others are checked against the bound below
        problems += check_compact(ids, lp, tail, target, hit, enc, where)
        hit[:, 1:] = False
    rows, cols = np.nonzero(hit)
    if len(rows):
        want, got = lp[rows, cols], target[rows]
        off = np.abs(want - got) > 1e-4 + 2 * ROUNDING[lp_dtype] * np.abs(got)
        if off.any():
            problems.append(f"{where} field target_logprob: disagrees with the top-k entry of the next token "
                            f"({int(off.sum())} rows, first at token {int(rows[np.argmax(off)])})")

    if "sample_ids" in tok:
        s_ids, counts = tok["sample_ids"], tok["sample_counts"].astype(np.int64)
        pad = s_ids == -1
        bad("sample_ids", ((s_ids < 0) & ~pad) | (s_ids >= vocab), f"ids outside [0, {vocab}) and not padding -1")
        bad("sample_counts", pad & (counts != 0), "padding with a non-zero count")
        bad("sample_counts", ~pad & (counts == 0), "a sampled id with count 0")
        bad("sample_counts", counts.sum(axis=1) != m.sample_draws, f"counts do not sum to {m.sample_draws} draws")
        if s_ids.shape[1] > 1:
            # padding gets distinct sentinels below any int32, so it never collides with a stored id
            srt = np.sort(np.where(pad, np.iinfo(np.int64).min + np.arange(s_ids.shape[1]), s_ids), axis=1)
            bad("sample_ids", srt[:, 1:] == srt[:, :-1], "repeated id in one row")
    if "loss_mask" in tok:
        bad("loss_mask", tok["loss_mask"] > 1, "values other than 0 and 1")
    if "position_ids" in tok:
        pos = tok["position_ids"]
        prev = np.concatenate([[-1], pos[:-1]])
        first = np.zeros(block.num_tokens, dtype=bool)
        first[block.offsets[:-1][lengths > 0]] = True
        ok = (pos == 0) | ((pos == prev + 1) & ~first)
        bad("position_ids", ~ok, "neither 0 nor one more than the previous position")
    if "byte_offsets" in tok:
        bo = tok["byte_offsets"]
        bad("byte_offsets", (bo[:, 0] < 0) | (bo[:, 1] < bo[:, 0]), "start < 0 or end < start")
    for name, spec in m.fields.items():
        if name.startswith("hidden/"):
            bad(name, ~np.isfinite(to_float32(tok[name], spec.dtype)), "non-finite values")
    bad("doc_index", block.sequence["doc_index"] < 0, "negative document index")
    return problems


def check_compact(ids: np.ndarray, lp: np.ndarray, tail: np.ndarray, target: np.ndarray, hit: np.ndarray,
                  enc: CompactTopk, where: str) -> list[str]:
    """The bound of a compact top-k (SPEC.md, "Compact top-k"), as far as the cache itself can show it.

    Every entry after the top-1 holds a codebook value v_c, and the source's probability p of its id lay in
    [v_{c-1}, v_{c+1}] (v_{-1} = 0; above the last code, up to the top-1's). So, per row: the source's top-k mass
    1 - exp(tail) lies between the sums of the lower and upper neighbours; where the next token is one of these
    entries, exp(target_logprob) lies between that entry's neighbours; the stored mass is at most the source's
    (the writer's rounding never adds mass); and the top-1 is strictly the most probable entry."""
    problems = []
    k = ids.shape[1]
    cb = enc.values
    codes = np.searchsorted(cb, lp[:, 1:])  # (T, k-1)
    off_book = (codes >= len(cb)) | (cb[np.minimum(codes, len(cb) - 1)] != lp[:, 1:])
    if off_book.any():
        problems.append(f"{where} field topk_logprobs: a value after the top-1 is not in the codebook "
                        f"({int(off_book.any(axis=1).sum())} rows, first at token {_first(off_book)})")
        return problems
    if k > 1 and (lp[:, 0] <= lp[:, 1]).any():
        problems.append(f"{where} field topk_logprobs: the top-1 is not strictly above the other entries "
                        f"(first at token {_first(lp[:, 0] <= lp[:, 1])})")
    p1 = np.exp(lp[:, :1].astype(np.float64))  # (T, 1)
    vals = np.exp(cb.astype(np.float64))
    lower = np.where(codes > 0, vals[np.maximum(codes - 1, 0)], 0.0)  # (T, k-1)
    upper = np.where(codes < len(cb) - 1, vals[np.minimum(codes + 1, len(cb) - 1)], p1)
    tol = MASS_TOLERANCE[enc.source_dtype]
    with np.errstate(over="ignore", invalid="ignore"):
        source_mass = 1.0 - np.exp(tail.astype(np.float64))  # the source's top-k mass
        stored = p1[:, 0] + vals[codes].sum(axis=1)
    low, high = p1[:, 0] + lower.sum(axis=1), p1[:, 0] + upper.sum(axis=1)
    outside = ~((low - tol <= source_mass) & (source_mass <= high + tol))
    if outside.any():
        problems.append(f"{where} field topk_logprobs: the quantization bound does not hold: the source's top-k mass "
                        f"1 - exp(tail_logmass) is outside the codes' bounds ({int(outside.sum())} rows, first at "
                        f"token {int(np.flatnonzero(outside)[0])})")
    over = ~(stored <= source_mass + tol)
    if over.any():
        problems.append(f"{where} field topk_logprobs: the stored top-k holds more mass than the source's "
                        f"1 - exp(tail_logmass) ({int(over.sum())} rows, first at token {int(np.flatnonzero(over)[0])})")
    rows, cols = np.nonzero(hit[:, 1:])
    if len(rows):
        got = target[rows].astype(np.float64)
        slack = 1e-4 + 2 * ROUNDING[enc.source_dtype] * np.abs(got)
        with np.errstate(divide="ignore"):
            lo, hi = np.log(lower[rows, cols]), np.log(upper[rows, cols])
        off = (got < lo - slack) | (got > hi + slack)
        if off.any():
            problems.append(f"{where} field target_logprob: the next token's probability is outside the bound of its "
                            f"code ({int(off.sum())} rows, first at token {int(rows[np.argmax(off)])})")
    return problems


def _check_files(cache: Cache, entry: ShardEntry, where: str) -> list[str]:
    problems = []
    listing = []
    for f in entry.files:
        listing.append(f"{f.path}\t{f.bytes}\t{f.sha256}\n")  # the manifest's own listing, missing files too
        path = cache.path_of(entry, f.path)
        name = f.path or entry.path
        h = hashlib.sha256()
        size = 0
        try:
            with cache.fs.open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
                    size += len(chunk)
        except (FileNotFoundError, IsADirectoryError):
            problems.append(f"{where}: file {name!r} is missing")
            continue
        if size != f.bytes:
            problems.append(f"{where}: file {name!r} has {size} bytes, the manifest says {f.bytes}")
        elif h.hexdigest() != f.sha256:
            problems.append(f"{where}: file {name!r} sha256 mismatch (damaged or changed)")
    if len(entry.files) > 1 or entry.files[0].path:
        if hashlib.sha256("".join(sorted(listing)).encode()).hexdigest() != entry.sha256:
            problems.append(f"{where}: shard sha256 does not match its file list")
    elif entry.files[0].sha256 != entry.sha256:
        problems.append(f"{where}: shard sha256 differs from its file's sha256")
    return problems + _shard_extra_files(cache, entry, where)


def _shard_extra_files(cache: Cache, entry: ShardEntry, where: str) -> list[str]:
    """Files inside a local shard folder (a Zarr group) that its manifest entry does not list."""
    if not (cache.local and os.path.isdir(cache.path_of(entry))):
        return []
    known = {f.path for f in entry.files}
    base = cache.path_of(entry)
    problems = []
    for dirpath, _, names in os.walk(base):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), base).replace(os.sep, "/")
            if rel not in known:
                problems.append(f"{where}: unknown extra file {rel!r} in the shard")
    return problems


def unknown_files(cache: Cache) -> list[str]:
    """Files and folders of a local cache that its manifest does not name, one line each; no file is read.

    A file the manifest does not name may be a shard someone copied in by hand: its data would be silently
    left out, so the trainer refuses such a cache as verify reports it (see Cache.check_structure).
    """
    problems = _extra_files(cache)
    for entry in cache.manifest.shards:
        problems += _shard_extra_files(cache, entry, f"{cache.url}: shard {entry.path!r}")
    return problems


def _extra_files(cache: Cache) -> list[str]:
    """Files and folders in a local cache directory that the manifest does not name."""
    if not cache.local:
        return []
    shard_paths = {s.path for s in cache.manifest.shards}
    parents = {p.rsplit("/", i)[0] for p in shard_paths for i in range(1, p.count("/") + 1)}
    parents.add(SHARD_DIR)  # the writer's shard folder belongs to the layout even while it is empty
    # A merged cache keeps each part's own manifest, card and lock beside the part's shards.
    parts = cache.manifest.extra.get("parts", [])
    own = _OWN_FILES | {f"{p}/{name}" for p in parts for name in _OWN_FILES}
    parents |= {p.rsplit("/", i)[0] for p in parts for i in range(0, p.count("/") + 1)}
    parents |= {f"{p}/{SHARD_DIR}" for p in parts}
    problems = []
    for dirpath, dirnames, names in os.walk(cache.root):
        rel_dir = os.path.relpath(dirpath, cache.root).replace(os.sep, "/")
        prefix = "" if rel_dir == "." else rel_dir + "/"
        for n in names:
            if prefix + n not in own and prefix + n not in shard_paths:
                problems.append(f"{cache.url}: unknown extra file {prefix + n!r} (not named by the manifest)")
        keep = []
        for d in dirnames:
            if prefix + d in parents:
                keep.append(d)
            elif prefix + d not in shard_paths:  # zarr groups are checked against their own file lists
                problems.append(f"{cache.url}: unknown extra directory {prefix + d!r} (not named by the manifest)")
        dirnames[:] = keep
    return problems


def verify_cache(url: str, checksums: bool = True) -> list[str]:
    """Every problem of the cache at `url`, one line each; an empty list means the cache is sound."""
    try:
        cache = open_cache(url)
    except CacheError as e:
        return [str(e)]
    problems = [] if cache.manifest.complete else [f"{url}: the cache is incomplete (build interrupted or running)"]
    problems += _extra_files(cache)
    for entry in cache.manifest.shards:
        where = f"{url}: shard {entry.path!r}"
        try:
            if checksums:
                file_problems = _check_files(cache, entry, where)
                problems += file_problems
                if file_problems:
                    continue
            block = cache.read_shard(entry)
        except CacheError as e:
            problems.append(str(e))
            continue
        if len(block) != entry.sequences:
            problems.append(f"{where}: holds {len(block)} sequences, the manifest says {entry.sequences}")
            continue
        if content_sha256(block, cache.manifest.fields) != entry.content_sha256:
            problems.append(f"{where}: content checksum differs from the manifest")
        problems += check_values(block, cache, where)
    return problems
