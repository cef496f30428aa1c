"""`kdcache convert`: the same logical arrays in the other backend, shard for shard; or a smaller cache derived
from a bigger one (fewer top-k entries, RS-KD samples dropped), which is exactly what a build with those settings
would have stored, up to the rounding of the tail mass (see `derive_block`)."""

from __future__ import annotations

import copy
import dataclasses
import os

import numpy as np

from formats.errors import CacheError
from formats.manifest import Manifest
from formats.overlap import check_no_overlap
from formats.reader import open_cache
from formats.schema import FieldSpec, SeqBlock, to_float32
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


def convert_cache(src: str | os.PathLike, backend: str, out: str | os.PathLike, overwrite: bool = False,
                  top_k: int | None = None, drop_samples: bool = False) -> Manifest:
    """Rewrite cache `src` with `backend` into `out`.

    A plain conversion must reproduce every shard's content checksum. With `top_k` (<= the cache's k) or
    `drop_samples` the content changes by design: the shards are rewritten by `derive_block`, the field table and
    `build.top_k` / `build.sample_draws` follow, and `build.derived_from` records the source's k and draws.
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
                new = writer.write_shard(entry.split, derive_block(block, m.fields, k, drop_samples))
            else:
                new = writer.write_shard(entry.split, block)
                if new.content_sha256 != entry.content_sha256:
                    raise CacheError(f"{out}: shard {new.path!r} content checksum differs from {src} shard {entry.path!r}")
        return writer.finish()
    finally:
        writer.close()
