"""`kdcache convert`: the same logical arrays in the other backend, shard for shard; or a smaller cache derived
from a bigger one (fewer top-k entries, RS-KD samples dropped), which is exactly what a build with those settings
would have stored, up to the rounding of the tail mass (see `derive_block`); or the top-k stored the other way
(plain <-> compact, SPEC.md "Compact top-k")."""

from __future__ import annotations

import copy
import dataclasses
import os

import numpy as np

from formats.errors import CacheError
from formats.manifest import Manifest
from formats.overlap import check_no_overlap
from formats.reader import open_cache
from formats.schema import TOPK_ENCODINGS, FieldSpec, SeqBlock, to_float32, topk_encoding_of, with_topk_encoding
from formats.topk_codec import DEFAULT_LOGPROB_BITS, CompactTopk
from formats.writer import CacheWriter

SAMPLE_FIELDS = ("sample_ids", "sample_counts")


def derive_block(block: SeqBlock, fields: dict[str, FieldSpec], top_k: int, drop_samples: bool) -> SeqBlock:
    """The block a build with `top_k` (and without samples when `drop_samples`) would have written.

    The stored top-k is sorted most probable first, so the top `top_k` are its first `top_k` entries, copied bit for
    bit. The new tail holds the old tail plus the dropped entries, summed in float64 and stored as F32:
        tail_k = log(exp(tail_K) + sum_{k < j <= K} exp(logprob_j))
    With F16/BF16 log-probs the dropped entries carry their storage rounding into the tail (within the tolerance
    `kdcache verify` allows for that dtype).
    """
    token = dict(block.token)
    if top_k == 0:  # samples-only: the tail is all the mass, log 1 = 0 exactly, as a k = 0 build stores it
        token["tail_logmass"] = np.zeros(block.num_tokens, dtype=np.float32)
        for name in ("topk_ids", "topk_logprobs"):
            token.pop(name, None)
        return dataclasses.replace(block, token=token)
    lp = to_float32(token["topk_logprobs"], fields["topk_logprobs"].dtype).astype(np.float64)  # (N, K)
    dropped = np.logaddexp.reduce(lp[:, top_k:], axis=1) if lp.shape[1] > top_k else np.full(len(lp), -np.inf)
    token["tail_logmass"] = np.logaddexp(token["tail_logmass"].astype(np.float64), dropped).astype(np.float32)  # (N,)
    token["topk_ids"] = np.ascontiguousarray(token["topk_ids"][:, :top_k])  # (N, k)
    token["topk_logprobs"] = np.ascontiguousarray(token["topk_logprobs"][:, :top_k])  # (N, k)
    if drop_samples:
        for name in SAMPLE_FIELDS:
            token.pop(name, None)
    return dataclasses.replace(block, token=token)


def plain_from_compact(block: SeqBlock) -> SeqBlock:
    """A compact top-k's decoded block as a plain cache stores it (SPEC.md, "Compact top-k", converting to plain).

    The codes keep less mass than the source's entries (the bound: never more), and a plain cache's top-k and tail
    sum to 1, so the mass they leave out joins the tail, summed in float64 as `derive_block` does with dropped
    entries (never below the stored tail, which the bound already guarantees up to rounding):
        tail' = log(max(exp(tail), 1 - sum_j exp(logprob_j)))
    and where the next token is an entry after the top-1, `target_logprob` becomes that entry's stored value. The
    plain cache then describes one distribution: the compact cache's values with the rest of the mass outside them.
    """
    token = dict(block.token)
    lp = token["topk_logprobs"]  # (N, k) float32, codebook values after the top-1
    rest = 1.0 - np.exp(lp.astype(np.float64)).sum(axis=1)  # (N,)
    with np.errstate(divide="ignore"):
        tail = np.log(np.maximum(np.exp(token["tail_logmass"].astype(np.float64)), rest))
    token["tail_logmass"] = tail.astype(np.float32)
    nxt = np.append(token["input_ids"][1:], -1)
    nxt[block.offsets[1:] - 1] = -1  # the last position of a sequence has no next token
    rows, cols = np.nonzero(token["topk_ids"][:, 1:] == nxt[:, None])
    target = token["target_logprob"].copy()
    target[rows] = lp[rows, cols + 1]
    token["target_logprob"] = target
    return dataclasses.replace(block, token=token)


def target_encoding(fields: dict[str, FieldSpec], vocab_size: int, topk_encoding: str | None,
                    logprob_bits: int | None, where: str) -> CompactTopk | None:
    """The top-k encoding a conversion writes: the source's unless `topk_encoding` ("plain" | "compact") or
    `logprob_bits` (compact only) says otherwise. A compact top-k made from a plain one records the plain dtype
    as its source dtype; one made from a compact one keeps the source dtype it had."""
    src = topk_encoding_of(fields)
    if topk_encoding is not None and topk_encoding not in TOPK_ENCODINGS:
        raise CacheError(f"{where}: top-k encoding must be one of {TOPK_ENCODINGS}, got {topk_encoding!r}")
    compact = topk_encoding == "compact" or (topk_encoding is None and src is not None)
    if not compact:
        if logprob_bits is not None:
            raise CacheError(f"{where}: --logprob-bits applies to a compact top-k (--topk-encoding compact)")
        return None
    if "topk_ids" not in fields:
        raise CacheError(f"{where}: a samples-only cache has no top-k to store compactly")
    if logprob_bits is None and src is not None:
        return src
    source_dtype = src.source_dtype if src is not None else fields["topk_logprobs"].dtype
    return CompactTopk.make(DEFAULT_LOGPROB_BITS if logprob_bits is None else logprob_bits, vocab_size, source_dtype)


def convert_cache(src: str | os.PathLike, backend: str, out: str | os.PathLike, overwrite: bool = False,
                  top_k: int | None = None, drop_samples: bool = False, topk_encoding: str | None = None,
                  logprob_bits: int | None = None) -> Manifest:
    """Rewrite cache `src` with `backend` into `out`.

    A plain conversion must reproduce every shard's content checksum. With `top_k` (<= the cache's k) or
    `drop_samples` the content changes by design: the shards are rewritten by `derive_block`, the field table and
    `build.top_k` / `build.sample_draws` follow, and `build.derived_from` records the source's k and draws.
    `topk_encoding` "compact" stores the top-k in `logprob_bits`-bit codes (quantized: the content changes, the
    top-1 and tail do not); "plain" stores a compact top-k's decoded values as F32 (`plain_from_compact`: the mass
    the codes leave out joins the tail). `build.topk_encoding` (and `build.logprob_bits`) record a changed encoding;
    `build.decoded_from` the codes the values come from when the source was compact (re-quantizing with other
    `logprob_bits` starts from `plain_from_compact` too, so the new codes' bound holds against what they encode).
    """
    check_no_overlap("--out", os.fspath(out), {"the source cache": [os.fspath(src)]})
    cache = open_cache(src, require_complete=True)
    m = cache.manifest
    k = m.top_k if top_k is None else top_k
    if not 0 <= k <= m.top_k:
        raise CacheError(f"{src}: convert --top-k must be in [0, {m.top_k}] (the cache's k), got {k}")
    if k == 0 and "sample_ids" not in m.fields:
        raise CacheError(f"{src}: convert --top-k 0 keeps only the RS-KD samples, and this cache has none")
    if k == 0 and drop_samples:
        raise CacheError(f"{src}: --drop-samples with top-k 0 would leave no teacher distribution"
                         + (" (this cache keeps only RS-KD samples)" if m.top_k == 0 else ""))
    derive = k != m.top_k or (drop_samples and "sample_ids" in m.fields)
    encoding = target_encoding(m.fields, m.vocab_size, topk_encoding, logprob_bits, str(src))
    if k == 0 and topk_encoding is None:
        encoding = None  # nothing left to encode
    if encoding is not None and k < 2:
        raise CacheError(f"{src}: a compact top-k needs k >= 2; convert with --topk-encoding plain")
    fields, build = dict(m.fields), copy.deepcopy(m.build)
    if derive:
        if k:
            fields["topk_ids"] = dataclasses.replace(fields["topk_ids"], shape=(k,))
            fields["topk_logprobs"] = dataclasses.replace(fields["topk_logprobs"], shape=(k,))
        else:
            fields.pop("topk_ids")
            fields.pop("topk_logprobs")
        build["derived_from"] = {"top_k": m.top_k, "sample_draws": m.sample_draws}
        build["top_k"] = k
        if drop_samples:
            for name in SAMPLE_FIELDS:
                fields.pop(name, None)
            build["sample_draws"] = 0
    source_encoding = topk_encoding_of(m.fields)
    recode = k > 0 and encoding != source_encoding
    if recode:
        fields = with_topk_encoding(fields, encoding)
        build["topk_encoding"] = "plain" if encoding is None else "compact"
        build.pop("logprob_bits", None)
        if encoding is not None:
            build["logprob_bits"] = encoding.logprob_bits
        if source_encoding is not None:
            build["decoded_from"] = {"topk_encoding": "compact", "logprob_bits": source_encoding.logprob_bits}
    target = Manifest(
        backend=backend,
        fields=fields,
        teacher=copy.deepcopy(m.teacher),
        tokenizer=copy.deepcopy(m.tokenizer),
        build=build,
        corpus=copy.deepcopy(m.corpus),
        created_by=m.created_by,
        extra=copy.deepcopy(m.extra),
    )
    writer = CacheWriter(out, target, shard_tokens=1, overwrite=overwrite)
    try:
        seen: dict[str, int] = {}
        for entry in m.shards:
            index = seen[entry.split] = seen.get(entry.split, -1) + 1
            if index < sum(1 for s in writer.manifest.shards if s.split == entry.split):
                continue  # a resumed conversion wrote this one already
            block = cache.read_shard(entry)
            if derive:
                block = derive_block(block, m.fields, k, drop_samples)
            if recode and source_encoding is not None:  # to plain, or other codes: from the distribution decoded
                block = plain_from_compact(block)
            elif recode:  # a compact top-k is written from (and read back as) float32 log-probs
                block.token["topk_logprobs"] = to_float32(block.token["topk_logprobs"], m.fields["topk_logprobs"].dtype)
            new = writer.write_shard(entry.split, block)
            if not derive and not recode:  # the same logical arrays: the same checksum
                if new.content_sha256 != entry.content_sha256:
                    raise CacheError(f"{out}: shard {new.path!r} content checksum differs from {src} shard {entry.path!r}")
        return writer.finish()
    finally:
        writer.close()
