"""The local shard cache: a remote cache's shards are downloaded whole, checked against the manifest's checksums,
and read from local disk at local speed (SPEC.md, "Reading remote caches").

Shards are kept by their sha256 (`<dir>/<sha[:2]>/<sha>/<shard name>`), so any cache holding the same shard, and
every later run, reuses the download. The folder is $KDCACHE_SHARD_CACHE (`--shard-cache DIR`), else
`kdcache_home()/shards`; it is bounded by $KDCACHE_SHARD_CACHE_GB (`--shard-cache-gb`, default 50): after each
download the least recently used shards are removed until it fits, except the last PINNED shards this process
fetched (the loader may still be reading them). Downloads use plain GETs of whole files, so a server without Range
requests (`python -m http.server`) serves a cache as well as an object store does.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections import deque
from pathlib import Path

from formats.errors import CacheError
from formats.home import kdcache_home
from formats.manifest import ShardEntry
from formats.store import Store, describe_error
from formats.writer import file_sha256

DIR_ENV = "KDCACHE_SHARD_CACHE"
SIZE_ENV = "KDCACHE_SHARD_CACHE_GB"
DEFAULT_GB = 50.0
PINNED = 8
_recent: deque[str] = deque(maxlen=PINNED)
_evict_lock = threading.Lock()


def cache_dir() -> Path:
    return Path(os.environ[DIR_ENV]).expanduser() if os.environ.get(DIR_ENV) else kdcache_home() / "shards"


def cache_bytes() -> int:
    text = os.environ.get(SIZE_ENV, "")
    try:
        gb = float(text) if text else DEFAULT_GB
    except ValueError:
        raise CacheError(f"${SIZE_ENV}: expected a number of GB, got {text!r}") from None
    return int(gb * 2**30)


def local_shard(store: Store, entry: ShardEntry, where: str, refresh: bool = False) -> str:
    """The local path of `entry`'s shard, downloaded into the shard cache and checked first when it is not there
    (or always, with `refresh`: `kdcache verify` checks the remote bytes themselves)."""
    name = entry.path.rsplit("/", 1)[-1]
    home = cache_dir() / entry.sha256[:2] / entry.sha256
    final = home / name
    if final.exists() and not refresh:
        os.utime(home)  # least recently used goes first
        _recent.append(entry.sha256)
        return str(final)
    tmp = cache_dir() / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(tmp / name if not _single(entry) else tmp, exist_ok=True)
        for f in entry.files:
            target = tmp / name if _single(entry) else tmp / name / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            remote = store.path(f"{entry.path}/{f.path}" if f.path else entry.path)
            try:
                store.fs.get_file(remote, str(target))  # one plain GET per file
            except FileNotFoundError:
                raise CacheError(f"{where}: file {f.path or entry.path!r} is missing") from None
            except Exception as e:
                raise CacheError(f"{where}: could not download {f.path or entry.path!r} ({describe_error(e)})") from None
            size = target.stat().st_size
            if size != f.bytes:
                raise CacheError(f"{where}: file {f.path or entry.path!r} has {size} bytes, the manifest says {f.bytes}")
            if file_sha256(target) != f.sha256:
                raise CacheError(f"{where}: file {f.path or entry.path!r} sha256 mismatch (damaged or changed)")
        home.mkdir(parents=True, exist_ok=True)
        # A copy already there (another thread or process got there first, or `refresh`) holds the same checked
        # bytes and may be open in a reader: it stays, and this download is dropped.
        if not final.exists():
            try:
                os.rename(tmp / name, final)
            except OSError:
                if not final.exists():
                    raise
    except OSError as e:
        raise CacheError(f"{where}: could not store it in the shard cache {cache_dir()} ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    os.utime(home)
    _recent.append(entry.sha256)
    evict()
    return str(final)


def _single(entry: ShardEntry) -> bool:
    return len(entry.files) == 1 and entry.files[0].path == ""


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def evict(limit: int | None = None) -> None:
    """Remove least recently used shards until the cache holds at most `limit` bytes (default: the bound)."""
    limit = cache_bytes() if limit is None else limit
    root = cache_dir()
    with _evict_lock:
        shards = [(d.stat().st_mtime, d) for top in root.glob("??") for d in top.iterdir() if d.is_dir()]
        sizes = {d: _size(d) for _, d in shards}
        total = sum(sizes.values())
        for _, d in sorted(shards):
            if total <= limit:
                break
            if d.name in _recent:
                continue
            shutil.rmtree(d, ignore_errors=True)
            total -= sizes[d]
