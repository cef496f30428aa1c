"""`kdcache copy SRC DST`: mirror a finished cache between stores (local, s3://, gs://, http(s):// as a source),
shard by shard, each one's checksums verified before it is published at DST, the manifest last.

The copy is a cache being written: DST is locked, its manifest names each shard once it is in place, and a copy
that stopped resumes after the last shard it published. Shard paths, file bytes and checksums stay the source's.
"""

from __future__ import annotations

import copy as _copy
import os
from pathlib import Path

from formats.errors import CacheError
from formats.manifest import Manifest
from formats.overlap import check_no_overlap
from formats.reader import open_cache
from formats.store import open_store
from formats.writer import CacheWriter, place_shard, shard_files


def copy_cache(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool = False) -> Manifest:
    check_no_overlap("DST", os.fspath(dst), {"SRC": [os.fspath(src)]})
    cache = open_cache(src, require_complete=True)
    m = cache.manifest
    source, target_store = open_store(src), open_store(dst, writing=True)
    if (source.protocol, source.root.rstrip("/")) == (target_store.protocol, target_store.root.rstrip("/")):
        raise CacheError(f"{dst}: copy needs another place than the source cache")
    target = Manifest(backend=m.backend, fields=dict(m.fields), teacher=_copy.deepcopy(m.teacher),
                      tokenizer=_copy.deepcopy(m.tokenizer), build=_copy.deepcopy(m.build),
                      corpus=_copy.deepcopy(m.corpus), created_by=m.created_by, format_version=m.format_version,
                      extra=_copy.deepcopy(m.extra))
    writer = CacheWriter(target_store, target, shard_tokens=1, overwrite=overwrite)
    try:
        done = writer.manifest.shards
        if [s.to_json() for s in done] != [s.to_json() for s in m.shards[: len(done)]]:
            raise CacheError(f"{dst} holds a copy of another cache (its shards differ from {src}'s); "
                             "use --overwrite to delete it and copy anew")
        for entry in m.shards[len(done):]:
            where = f"{src}: shard {entry.path!r}"
            if cache.local:  # a remote source's shards are checked as the shard cache downloads them
                local = Path(cache.path_of(entry))
                files, sha = shard_files(local)
                if files != entry.files or sha != entry.sha256:
                    raise CacheError(f"{where}: its files differ from the manifest's checksums (run kdcache verify)")
            else:
                local = Path(cache.local_path(entry))
            place_shard(writer.store, entry.path, local, entry.files)
            writer.adopt(entry)
        return writer.finish()
    finally:
        writer.close()
