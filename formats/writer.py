"""Writing a cache: shards published atomically, the manifest rewritten after each one, resumable.

The unit of progress is a published shard. Sequences arrive per split in a deterministic order and are
cut into shards at deterministic points (a shard closes once it holds `shard_tokens` tokens), so a build
that dies and is re-run continues after the last published shard and ends with the same bytes as one
that never stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from formats.errors import CacheError
from formats.manifest import (MANIFEST_NAME, MAX_MANIFEST_BYTES, FileEntry, Manifest, ShardEntry, fsync_dir,
                              parse_manifest, write_manifest)
from formats.schema import FORMAT_NAME, FieldSpec, SeqBlock, check_block, content_sha256

LOCK_NAME = ".lock"
SHARD_DIR = "shards"
EXT = {"parquet": ".parquet", "zarr": ".zarr"}


def file_sha256(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def shard_files(path: Path) -> tuple[tuple[FileEntry, ...], str]:
    """Checksums of a shard on local disk: its file entries and the shard sha256 (SPEC.md, shards)."""
    if path.is_file():
        entry = FileEntry("", path.stat().st_size, file_sha256(path))
        return (entry,), entry.sha256
    entries = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            entries.append(FileEntry(full.relative_to(path).as_posix(), full.stat().st_size, file_sha256(full)))
    entries.sort(key=lambda e: e.path)
    listing = "".join(f"{e.path}\t{e.bytes}\t{e.sha256}\n" for e in entries)
    return tuple(entries), hashlib.sha256(listing.encode()).hexdigest()


def _fsync_tree(path: Path) -> None:
    if path.is_file():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with open(Path(dirpath) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_shard_files(path: Path, block: SeqBlock, fields: dict[str, FieldSpec], backend: str) -> None:
    """Write a shard in `backend` at `path` (not atomic; see CacheWriter.write_shard)."""
    if backend == "parquet":
        from formats import shard_parquet

        shard_parquet.write(path, block, fields)
    else:
        from formats import shard_zarr

        shard_zarr.write(path, block, fields)


SETTINGS_KEYS = ("backend", "fields", "teacher", "tokenizer", "build", "corpus")


def _settings(m: Manifest) -> dict:
    j = m.to_json()
    return {k: j[k] for k in SETTINGS_KEYS}


def made_by_kdcache(root: Path) -> bool:
    """Whether `root` holds a kdcache manifest (of any version, complete or not): the only kind of folder kdcache
    writes into or deletes besides an empty one."""
    try:
        with open(root / MANIFEST_NAME, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError:
        return False
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):  # a damaged one still names its format as kdcache writes it
        return f'"format": "{FORMAT_NAME}"'.encode() in data
    return isinstance(obj, dict) and obj.get("format") == FORMAT_NAME


class CacheWriter:
    """Owns a cache directory while it is written: lock, shard publication, manifest, card.

    Opening a directory that already holds a manifest with the same settings resumes it; different
    settings are refused (naming the first difference) unless `overwrite`.
    """

    def __init__(self, root: str | os.PathLike, manifest: Manifest, shard_tokens: int, overwrite: bool = False):
        if shard_tokens <= 0:
            raise CacheError(f"shard_tokens must be positive, got {shard_tokens}")
        self.root = Path(root)
        self.shard_tokens = shard_tokens
        try:
            # A foreign directory is refused before anything (even the lock file) is created in it, with
            # --overwrite too: kdcache deletes only what it made (a cache, or an empty folder).
            if self.root.is_dir() and not made_by_kdcache(self.root) and any(
                    c.name != LOCK_NAME for c in self.root.iterdir()):
                raise CacheError(f"{self.root} is not empty and is not a kdcache cache (no kdcache {MANIFEST_NAME}); "
                                 "kdcache writes into, and --overwrite deletes, only its own caches: choose another "
                                 "folder")
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.root / LOCK_NAME, "a+")
        except OSError as e:
            raise CacheError(f"{self.root}: cannot write a cache here ({e.strerror or e})") from None
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise CacheError(f"{self.root}: another process is writing this cache (it holds {LOCK_NAME})") from None
        try:
            self._start(manifest, overwrite)
        except OSError as e:
            self.close()
            raise CacheError(f"{self.root}: cannot write a cache here ({e.strerror or e})") from None
        except CacheError:
            self.close()  # release the lock: the caller may fix the problem and retry in this process
            raise
        self._pending: dict[str, list[dict[str, np.ndarray]]] = {}
        self._pending_tokens: dict[str, int] = {}

    def _start(self, manifest: Manifest, overwrite: bool) -> None:
        """Under the lock: resume the cache already here (same settings only) or start a new one."""
        self.manifest = manifest
        self.manifest.shards = []
        existing = self.root / MANIFEST_NAME
        if not overwrite and existing.exists():
            old = parse_manifest(existing.read_bytes(), str(existing))
            diff = _first_difference(_settings(old), _settings(manifest))
            if diff:
                raise CacheError(
                    f"{self.root} already holds a cache built with other settings ({diff}); "
                    "use the same command to resume it, or --overwrite to delete it and start over"
                )
            self.manifest.shards = list(old.shards)
        self._clean(wipe=overwrite)
        (self.root / SHARD_DIR).mkdir(exist_ok=True)
        self.manifest.complete = False
        write_manifest(self.root, self.manifest)

    def _clean(self, wipe: bool) -> None:
        """Remove what is not part of the cache: crash leftovers, shards the manifest does not name,
        and with `wipe` (overwrite) everything else in the directory."""
        known = {s.path for s in self.manifest.shards}
        for child in self.root.iterdir():
            if child.name != LOCK_NAME and (wipe or ".tmp-" in child.name):
                _remove(child)
        shard_dir = self.root / SHARD_DIR
        if shard_dir.is_symlink() or shard_dir.is_file():
            _remove(shard_dir)
        if shard_dir.is_dir():
            for child in shard_dir.iterdir():
                if f"{SHARD_DIR}/{child.name}" not in known:
                    _remove(child)

    def remove_leftovers(self) -> None:
        """Remove what is not part of the cache: temporary files of shard writers that died (e.g. a killed replica
        whose shard was redone elsewhere) and shard files the manifest does not name."""
        try:
            self._clean(wipe=False)
        except OSError as e:
            raise CacheError(f"{self.root}: cannot remove leftover files ({e.strerror or e})") from None

    def done_sequences(self, split: str) -> int:
        """Sequences of `split` already published (a resumed build skips this many)."""
        return sum(s.sequences for s in self.manifest.shards if s.split == split)

    def add(self, split: str, seq: dict[str, np.ndarray]) -> ShardEntry | None:
        """Buffer one sequence; publishes and returns a shard once `shard_tokens` tokens are buffered."""
        self._pending.setdefault(split, []).append(seq)
        self._pending_tokens[split] = self._pending_tokens.get(split, 0) + len(seq["input_ids"])
        if self._pending_tokens[split] >= self.shard_tokens:
            return self.flush(split)
        return None

    def flush(self, split: str) -> ShardEntry | None:
        seqs = self._pending.pop(split, [])
        self._pending_tokens.pop(split, None)
        if not seqs:
            return None
        return self.write_shard(split, SeqBlock.from_sequences(seqs, self.manifest.fields))

    def shard_path(self, split: str, index: int) -> str:
        """The relative path of shard `index` of `split` (0-based within the split)."""
        return f"{SHARD_DIR}/{split}-{index:05d}{EXT[self.manifest.backend]}"

    def write_shard(self, split: str, block: SeqBlock) -> ShardEntry:
        """Publish the next shard of `split`: its files (temp name, fsync, rename), then the manifest naming it."""
        index = sum(1 for s in self.manifest.shards if s.split == split)
        entry = write_shard(self.root, self.shard_path(split, index), split, block, self.manifest.fields,
                            self.manifest.backend)
        return self.publish(entry)

    def publish(self, entry: ShardEntry) -> ShardEntry:
        """Name a shard whose files are already in place (`write_shard`, possibly by another process) in the
        manifest. Shards of a split must be published in index order."""
        index = sum(1 for s in self.manifest.shards if s.split == entry.split)
        if entry.path != self.shard_path(entry.split, index):
            raise CacheError(f"{self.root}: shard {entry.path!r} published out of order (next is "
                             f"{self.shard_path(entry.split, index)!r})")
        self.manifest.shards.append(entry)
        try:
            write_manifest(self.root, self.manifest)
        except OSError as e:
            self.manifest.shards.pop()  # not named by the manifest on disk, so not part of the cache:
            with contextlib.suppress(OSError):  # removed, so the folder holds only what the manifest names
                _remove(self.root / entry.path)
            raise CacheError(f"{self.root / MANIFEST_NAME}: could not publish shard {entry.path} "
                             f"({e.strerror or e})") from None
        return entry

    def finish(self) -> Manifest:
        """Flush every split, mark the cache complete, write the card; returns the final manifest."""
        from formats.card import render_card
        from formats.manifest import atomic_write_bytes

        for split in list(self._pending):
            self.flush(split)
        self.manifest.complete = True
        try:
            atomic_write_bytes(self.root / "README.md", render_card(self.manifest).encode())
            write_manifest(self.root, self.manifest)
        except OSError as e:
            self.manifest.complete = False
            raise CacheError(f"{self.root}: could not finish the cache ({e.strerror or e})") from None
        self.close()
        return self.manifest

    def close(self) -> None:
        if not self._lock_file.closed:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_shard(root: Path, rel: str, split: str, block: SeqBlock, fields: dict[str, FieldSpec],
                backend: str) -> ShardEntry:
    """Write one shard's files at `root/rel` atomically (temp name, fsync, rename) and describe them; the shard
    is part of the cache only once a manifest names it (`CacheWriter.publish`). Any process may call this."""
    check_block(block, fields, f"shard of split {split!r}")
    final = Path(root) / rel
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        _remove(tmp)
        _remove(final)  # left by a crash between rename and manifest: not part of the cache
        write_shard_files(tmp, block, fields, backend)
        _fsync_tree(tmp)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        files, sha = shard_files(final)
    except OSError as e:
        for leftover in (tmp, final):
            with contextlib.suppress(OSError):
                _remove(leftover)
        raise CacheError(f"{final}: could not write shard ({e.strerror or e})") from None
    return ShardEntry(path=rel, split=split, sequences=len(block), tokens=block.num_tokens,
                      bytes=sum(f.bytes for f in files), sha256=sha, files=files,
                      content_sha256=content_sha256(block, fields))


def _first_difference(a: object, b: object, path: str = "") -> str | None:
    """'build.top_k: 8 != 16' for the first place two JSON values differ, else None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            sub = f"{path}.{key}" if path else key
            if key not in a or key not in b:
                return f"{sub}: {a.get(key, '<absent>')!r} != {b.get(key, '<absent>')!r}"
            d = _first_difference(a[key], b[key], sub)
            if d:
                return d
        return None
    return None if a == b else f"{path}: {a!r} != {b!r}"
