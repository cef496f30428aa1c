"""`kdcache convert`: the same logical arrays in the other backend, shard for shard."""

from __future__ import annotations

import copy
import os

from formats.errors import CacheError
from formats.manifest import Manifest
from formats.reader import open_cache
from formats.writer import CacheWriter


def convert_cache(src: str | os.PathLike, backend: str, out: str | os.PathLike, overwrite: bool = False) -> Manifest:
    """Rewrite cache `src` with `backend` into `out`; every shard's content checksum must come out equal."""
    cache = open_cache(src, require_complete=True)
    m = cache.manifest
    target = Manifest(
        backend=backend,
        fields=dict(m.fields),
        teacher=copy.deepcopy(m.teacher),
        tokenizer=copy.deepcopy(m.tokenizer),
        build=copy.deepcopy(m.build),
        corpus=copy.deepcopy(m.corpus),
        created_by=m.created_by,
        extra=copy.deepcopy(m.extra),
    )
    if os.path.abspath(os.fspath(out)) == os.path.abspath(os.fspath(src)):
        raise CacheError(f"{out}: convert needs a new output directory, not the source cache")
    writer = CacheWriter(out, target, shard_tokens=1, overwrite=overwrite)
    try:
        seen: dict[str, int] = {}
        for entry in m.shards:
            index = seen[entry.split] = seen.get(entry.split, -1) + 1
            if index < sum(1 for s in writer.manifest.shards if s.split == entry.split):
                continue  # a resumed conversion wrote this one already
            new = writer.write_shard(entry.split, cache.read_shard(entry))
            if new.content_sha256 != entry.content_sha256:
                raise CacheError(f"{out}: shard {new.path!r} content checksum differs from {src} shard {entry.path!r}")
        return writer.finish()
    finally:
        writer.close()
