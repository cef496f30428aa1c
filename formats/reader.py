"""Opening a cache: the manifest is checked first, then shards are read on demand.

`open_cache` accepts a local path or any fsspec URL. Shards are read whole, streamed block by block
(row groups / inner chunks: numpy views of the decoded buffers, no further copies), or by sequence
index for random access. A remote cache's shards are read from the local shard cache (formats/shard_cache.py),
which downloads each one whole and checks it first; opening a shard starts downloading the next PREFETCH ones
in manifest order in the background.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from formats.errors import CacheError
from formats.extra_files import unknown_files
from formats.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, ShardEntry, check_inside, parse_manifest
from formats.schema import SeqBlock
from formats.shard_cache import local_shard
from formats.shard_parquet import ParquetShard
from formats.shard_zarr import ZarrShard
from formats.store import Store, describe_error, open_store

PREFETCH = 4  # shards downloaded ahead of the one being read (remote caches)
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=PREFETCH, thread_name_prefix="kdcache-prefetch")
    return _POOL


@dataclass
class Cache:
    url: str
    manifest: Manifest
    fs: object  # fsspec filesystem
    root: str  # path of the cache inside `fs`
    local: bool
    store: Store | None = None
    _fetching: dict[str, Future] = field(default_factory=dict, repr=False)

    def path_of(self, entry: ShardEntry, file: str = "") -> str:
        rel = f"{entry.path}/{file}" if file else entry.path
        if self.local:
            check_inside(self.root, rel, f"{self.url}: shard {entry.path!r}")
            return os.path.join(self.root, rel)
        return f"{self.root.rstrip('/')}/{rel}"

    def shards(self, split: str | None = None) -> list[ShardEntry]:
        return self.manifest.split_shards(split)

    def check_structure(self, split: str | None = None) -> None:
        """Fast start-up check, reading no shard data: every file of every shard of `split` exists with the size
        the manifest records; each shard's own metadata (Parquet footer, Zarr array shapes and seq_offsets) holds
        the sequences and tokens the manifest says; a local cache holds no file the manifest does not name.
        Flipped bytes are left to `verify` (checksums), which reads everything."""
        for entry in self.shards(split):
            for f in entry.files:
                path = self.path_of(entry, f.path)
                try:
                    size = self.fs.size(path)
                except (FileNotFoundError, OSError):
                    raise CacheError(f"{self.url}: shard {entry.path!r} is missing file {f.path or entry.path!r}") from None
                except Exception as e:  # an object store's or HTTP client's error
                    raise CacheError(f"{self.url}: shard {entry.path!r}: cannot reach {f.path or entry.path!r} "
                                     f"({describe_error(e)})") from None
                if size != f.bytes:
                    raise CacheError(
                        f"{self.url}: shard {entry.path!r} file {f.path or entry.path!r} has {size} bytes, "
                        f"the manifest says {f.bytes}"
                    )
        for entry in self.shards(split):
            shard = self.open_shard(entry)  # checks the shard's sequence count (and Zarr shapes) against the entry
            tokens = shard.num_tokens
            if tokens != entry.tokens:
                raise CacheError(f"{self.url}: shard {entry.path!r} holds {tokens} tokens, the manifest says {entry.tokens}")
        extra = unknown_files(self)
        if not self.manifest.complete:  # a build still running has its next shard under a temporary name
            extra = [p for p in extra if ".tmp-" not in p]
        if extra:
            more = f" (and {len(extra) - 1} more; `kdcache verify` lists them)" if len(extra) > 1 else ""
            raise CacheError(extra[0] + more)

    def local_path(self, entry: ShardEntry, refresh: bool = False) -> str:
        """A remote shard's path in the local shard cache (downloaded and checked if needed), and downloads of the
        next PREFETCH shards started; `refresh`: download again even if cached."""
        where = f"{self.url}: shard {entry.path!r}"
        pending = self._fetching.pop(entry.path, None)
        if pending is not None and not refresh:
            try:
                path = pending.result()
            except CacheError:
                path = local_shard(self.store, entry, where)  # retried here, so its error is this call's
        else:
            path = local_shard(self.store, entry, where, refresh=refresh)
        if not refresh:
            shards = self.manifest.shards
            at = next((i for i, s in enumerate(shards) if s.path == entry.path), len(shards))
            for nxt in shards[at + 1: at + 1 + PREFETCH]:
                if nxt.path not in self._fetching:
                    self._fetching[nxt.path] = _pool().submit(local_shard, self.store, nxt,
                                                              f"{self.url}: shard {nxt.path!r}")
        return path

    def open_shard(self, entry: ShardEntry):
        """A reader for one shard (ParquetShard or ZarrShard), its structure checked against the manifest."""
        import zarr

        where = f"{self.url}: shard {entry.path!r}"
        path = self.path_of(entry) if self.local else self.local_path(entry)
        if self.manifest.backend == "parquet":
            if not os.path.isfile(path):
                raise CacheError(f"{where} is missing")
            shard = ParquetShard(path, self.manifest.fields, where)
            if shard.num_sequences != entry.sequences:
                raise CacheError(f"{where} holds {shard.num_sequences} sequences, the manifest says {entry.sequences}")
            return shard
        if not os.path.isdir(path):
            raise CacheError(f"{where} is missing")
        if self.local:
            for f in entry.files:
                self.path_of(entry, f.path)  # refuses files that are symlinks out of the cache
        store = zarr.storage.LocalStore(path, read_only=True)
        return ZarrShard(store, self.manifest.fields, where, entry.tokens, entry.sequences)

    def read_shard(self, entry: ShardEntry) -> SeqBlock:
        block = self.open_shard(entry).read_all()
        if block.num_tokens != entry.tokens:
            raise CacheError(f"{self.url}: shard {entry.path!r} holds {block.num_tokens} tokens, the manifest says {entry.tokens}")
        return block

    def iter_blocks(self, split: str | None = None) -> Iterator[SeqBlock]:
        """Every sequence of `split` (all splits when None), in manifest order, block by block."""
        for entry in self.shards(split):
            yield from self.open_shard(entry).iter_blocks()

    def num_sequences(self, split: str | None = None) -> int:
        return sum(s.sequences for s in self.shards(split))

    def sequence(self, i: int, split: str | None = None) -> dict[str, np.ndarray]:
        """Sequence `i` of `split` (counted across its shards in manifest order) as a dict of arrays."""
        shards = self.shards(split)
        starts = np.cumsum([0] + [s.sequences for s in shards]).tolist()
        if not 0 <= i < starts[-1]:
            raise IndexError(f"sequence {i} out of range: split {split!r} has {starts[-1]} sequences")
        j = bisect.bisect_right(starts, i) - 1
        local = i - starts[j]
        return self.open_shard(shards[j]).read_range(local, local + 1).get(0)


def open_cache(url: str | os.PathLike, require_complete: bool = False) -> Cache:
    """Open a cache directory or fsspec URL; the manifest is validated before anything else is read."""
    url = os.fspath(url)
    store = open_store(url)
    try:
        size = store.fs.size(store.path(MANIFEST_NAME))
        if size is not None and size > MAX_MANIFEST_BYTES:
            raise CacheError(f"{url}: manifest.json has {size} bytes, too large for a manifest")
        data = store.read_bytes(MANIFEST_NAME)
    except FileNotFoundError:
        raise CacheError(f"{url}: no {MANIFEST_NAME}; not a kdcache cache") from None
    except (IsADirectoryError, NotADirectoryError, PermissionError) as e:
        raise CacheError(f"{url}: cannot read {MANIFEST_NAME} ({e})") from None
    except CacheError:
        raise
    except Exception as e:  # an object store's or HTTP client's error: no bucket, no credentials, no server
        raise CacheError(f"{url}: cannot read {MANIFEST_NAME} ({describe_error(e)})") from None
    manifest = parse_manifest(data, f"{url}/{MANIFEST_NAME}")
    if require_complete and not manifest.complete:
        raise CacheError(f"{url}: the cache is incomplete (its build was interrupted or is still running)")
    return Cache(url=url, manifest=manifest, fs=store.fs, root=store.root, local=store.local, store=store)
