"""Files a local cache holds that its manifest does not name (`kdcache verify` lists them; the trainer refuses a
cache holding one). Only the local folder is walked: an object store's or web server's listing is not read."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from formats.lock import LOCK_NAME
from formats.manifest import MANIFEST_NAME, ShardEntry

if TYPE_CHECKING:  # the reader imports this module
    from formats.reader import Cache

SHARD_DIR = "shards"
_OWN_FILES = {MANIFEST_NAME, "README.md", LOCK_NAME}


def shard_extra_files(cache: Cache, entry: ShardEntry, where: str) -> list[str]:
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
    problems = extra_files(cache)
    for entry in cache.manifest.shards:
        problems += shard_extra_files(cache, entry, f"{cache.url}: shard {entry.path!r}")
    return problems


def extra_files(cache: Cache) -> list[str]:
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
