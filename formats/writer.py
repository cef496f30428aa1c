"""Writing a cache: shards published atomically, the manifest rewritten after each one, resumable.

The unit of progress is a published shard. Sequences arrive per split in a deterministic order and are
cut into shards at deterministic points (a shard closes once it holds `shard_tokens` tokens), so a build
that dies and is re-run continues after the last published shard and ends with the same bytes as one
that never stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from formats import shard_parquet, shard_zarr
from formats.atomic import fsync_dir
from formats.card import render_card
from formats.errors import CacheError
from formats.extra_files import SHARD_DIR
from formats.lock import LOCK_NAME, acquire
from formats.manifest import (MANIFEST_NAME, MAX_MANIFEST_BYTES, FileEntry, Manifest, ShardEntry, manifest_bytes,
                              parse_manifest)
from formats.schema import FORMAT_NAME, FieldSpec, SeqBlock, check_block, content_sha256
from formats.store import Store, describe_error, open_store

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


def write_shard_files(path: Path, block: SeqBlock, fields: dict[str, FieldSpec], backend: str) -> SeqBlock:
    """Write a shard in `backend` at `path` (not atomic; see CacheWriter.write_shard); returns the logical block
    that reading it gives back (a compact top-k comes back quantized)."""
    if backend == "parquet":
        return shard_parquet.write(path, block, fields)
    return shard_zarr.write(path, block, fields)


SETTINGS_KEYS = ("backend", "fields", "teacher", "tokenizer", "build", "corpus")


def _settings(m: Manifest) -> dict:
    j = m.to_json()
    return {k: j[k] for k in SETTINGS_KEYS}


def made_by_kdcache(store: Store) -> bool:
    """Whether `store` holds a kdcache manifest (of any version, complete or not): the only kind of folder kdcache
    writes into or deletes besides an empty one."""
    try:
        if not store.exists(MANIFEST_NAME):
            return False
        data = store.read_bytes(MANIFEST_NAME)[:MAX_MANIFEST_BYTES + 1]
    except Exception:  # unreadable (an OSError, or an object store client's error): not known to be kdcache's
        return False
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):  # a damaged one still names its format as kdcache writes it
        return f'"format": "{FORMAT_NAME}"'.encode() in data
    return isinstance(obj, dict) and obj.get("format") == FORMAT_NAME


class CacheWriter:
    """Owns a cache while it is written: lock, shard publication, manifest, card. `root` is a local folder, an
    fsspec URL (s3://, gs://, az://, ...) or a Store.

    Opening a cache that already holds a manifest with the same settings resumes it; different settings are
    refused (naming the first difference) unless `overwrite`.
    """

    def __init__(self, root: str | os.PathLike | Store, manifest: Manifest, shard_tokens: int, overwrite: bool = False):
        if shard_tokens <= 0:
            raise CacheError(f"shard_tokens must be positive, got {shard_tokens}")
        self.store = root if isinstance(root, Store) else open_store(root, writing=True)
        self.root = Path(self.store.root) if self.store.local else self.store.url
        self.shard_tokens = shard_tokens
        try:
            # A foreign folder or prefix is refused before anything (even the lock) is created in it, with
            # --overwrite too: kdcache deletes only what it made (a cache, or an empty folder).
            if not made_by_kdcache(self.store) and any(f != LOCK_NAME for f in _top_level(self.store)):
                raise CacheError(f"{self.root} is not empty and is not a kdcache cache (no kdcache {MANIFEST_NAME}); "
                                 "kdcache writes into, and --overwrite deletes, only its own caches: choose another "
                                 "folder")
            if self.store.local:
                os.makedirs(self.store.root, exist_ok=True)
        except OSError as e:
            raise CacheError(f"{self.root}: cannot write a cache here ({e.strerror or e})") from None
        self._lock = acquire(self.store)
        try:
            self._start(manifest, overwrite)
        except OSError as e:
            self.close()
            raise CacheError(f"{self.root}: cannot write a cache here ({e.strerror or e})") from None
        except CacheError:
            self.close()  # release the lock: the caller may fix the problem and retry in this process
            raise
        except Exception as e:  # an object store's client error
            self.close()
            raise CacheError(f"{self.root}: cannot write a cache here ({describe_error(e)})") from None

    def _start(self, manifest: Manifest, overwrite: bool) -> None:
        """Under the lock: resume the cache already here (same settings only) or start a new one."""
        self.manifest = manifest
        self.manifest.shards = []
        if not overwrite and self.store.exists(MANIFEST_NAME):
            old = parse_manifest(self.store.read_bytes(MANIFEST_NAME), self.store.name(MANIFEST_NAME))
            diff = _first_difference(_settings(old), _settings(manifest))
            if diff:
                raise CacheError(
                    f"{self.root} already holds a cache built with other settings ({diff}); "
                    "use the same command to resume it, or --overwrite to delete it and start over"
                )
            self.manifest.shards = list(old.shards)
        self._clean(wipe=overwrite)
        if self.store.local:
            os.makedirs(self.store.path(SHARD_DIR), exist_ok=True)
        self.manifest.complete = False
        self._write_manifest()

    def _clean(self, wipe: bool) -> None:
        """Remove what is not part of the cache: crash leftovers, shards the manifest does not name,
        and with `wipe` (overwrite) everything else."""
        if self.store.local:
            _clean_local(Path(self.store.root), {s.path for s in self.manifest.shards}, wipe)
            return
        known = {s.path for s in self.manifest.shards}
        for rel in self.store.files():
            top = rel.split("/", 1)[0]
            if rel == LOCK_NAME:
                continue
            shard = "/".join(rel.split("/")[:2])
            if wipe or ".tmp-" in rel or (top == SHARD_DIR and shard not in known):
                self.store.fs.rm_file(self.store.path(rel))

    def _write_manifest(self) -> None:
        self.store.write_bytes(MANIFEST_NAME, manifest_bytes(self.manifest))
        refresh = getattr(self._lock, "refresh", None)
        if refresh is not None:
            refresh()  # a lock object's heartbeat: each published shard renews it too

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

    def shard_path(self, split: str, index: int) -> str:
        """The relative path of shard `index` of `split` (0-based within the split)."""
        return f"{SHARD_DIR}/{split}-{index:05d}{EXT[self.manifest.backend]}"

    def write_shard(self, split: str, block: SeqBlock) -> ShardEntry:
        """Publish the next shard of `split`: its files (see `write_shard`), then the manifest naming it."""
        index = sum(1 for s in self.manifest.shards if s.split == split)
        entry = write_shard(self.store, self.shard_path(split, index), split, block, self.manifest.fields,
                            self.manifest.backend)
        return self.publish(entry)

    def publish(self, entry: ShardEntry) -> ShardEntry:
        """Name a shard whose files are already in place (`write_shard`, possibly by another process) in the
        manifest. Shards of a split must be published in index order."""
        index = sum(1 for s in self.manifest.shards if s.split == entry.split)
        if entry.path != self.shard_path(entry.split, index):
            raise CacheError(f"{self.root}: shard {entry.path!r} published out of order (next is "
                             f"{self.shard_path(entry.split, index)!r})")
        return self.adopt(entry)

    def adopt(self, entry: ShardEntry) -> ShardEntry:
        """Name a shard whose files are in place at any path (`kdcache copy` keeps the source's paths)."""
        self.manifest.shards.append(entry)
        try:
            self._write_manifest()
        except Exception as e:
            self.manifest.shards.pop()  # not named by the manifest in the store, so not part of the cache:
            with contextlib.suppress(Exception):  # removed, so the cache holds only what the manifest names
                self.store.remove(entry.path)
            raise CacheError(f"{self.store.name(MANIFEST_NAME)}: could not publish shard {entry.path} "
                             f"({describe_error(e) if not isinstance(e, OSError) else e.strerror or e})") from None
        return entry

    def finish(self) -> Manifest:
        """Mark the cache complete and write the card; returns the final manifest."""
        self.manifest.complete = True
        card = render_card(self.manifest).encode()
        try:
            self.store.write_bytes("README.md", card)
            self._write_manifest()
        except Exception as e:
            self.manifest.complete = False
            raise CacheError(f"{self.root}: could not finish the cache "
                             f"({e.strerror or e if isinstance(e, OSError) else describe_error(e)})") from None
        self.close()
        return self.manifest

    def close(self) -> None:
        self._lock.release()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _top_level(store: Store) -> list[str]:
    if store.local:
        return os.listdir(store.root) if os.path.isdir(store.root) else []
    return sorted({rel.split("/", 1)[0] for rel in store.files()})


def _clean_local(root: Path, known: set[str], wipe: bool) -> None:
    for child in root.iterdir():
        if child.name != LOCK_NAME and (wipe or ".tmp-" in child.name):
            _remove(child)
    shard_dir = root / SHARD_DIR
    if shard_dir.is_symlink() or shard_dir.is_file():
        _remove(shard_dir)
    if shard_dir.is_dir():
        for child in shard_dir.iterdir():
            if f"{SHARD_DIR}/{child.name}" not in known:
                _remove(child)


def write_shard(root: str | os.PathLike | Store, rel: str, split: str, block: SeqBlock, fields: dict[str, FieldSpec],
                backend: str) -> ShardEntry:
    """Write one shard's files at `root/rel` so that they appear under their final name only complete, and
    describe them; the shard is part of the cache only once a manifest names it (`CacheWriter.publish`). Any
    process may call this. `root`: a local folder, an fsspec URL or a Store.

    Local: temporary name, fsync, rename. Object store: the shard is written to a local temporary folder, uploaded
    under a temporary key, then copied to its final key (a server-side copy, which the store makes visible whole)
    and the temporary key removed (SPEC.md, "Writing")."""
    check_block(block, fields, f"shard of split {split!r}")
    store = root if isinstance(root, Store) else open_store(root, writing=True)
    if not store.local:
        return _write_remote_shard(store, rel, split, block, fields, backend)
    final = Path(store.root) / rel
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        _remove(tmp)
        _remove(final)  # left by a crash between rename and manifest: not part of the cache
        block = write_shard_files(tmp, block, fields, backend)  # the logical block: what reading it gives back
        _fsync_tree(tmp)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        files, sha = shard_files(final)
    except OSError as e:
        for leftover in (tmp, final):
            with contextlib.suppress(OSError):
                _remove(leftover)
        raise CacheError(f"{final}: could not write shard ({e.strerror or e})") from None
    return _entry(rel, split, block, fields, files, sha)


def _entry(rel: str, split: str, block: SeqBlock, fields: dict[str, FieldSpec], files: tuple[FileEntry, ...],
           sha: str) -> ShardEntry:
    return ShardEntry(path=rel, split=split, sequences=len(block), tokens=block.num_tokens,
                      bytes=sum(f.bytes for f in files), sha256=sha, files=files,
                      content_sha256=content_sha256(block, fields))


def place_shard(store: Store, rel: str, local: Path, files: tuple[FileEntry, ...]) -> None:
    """Put a shard's files, complete on local disk at `local`, at `rel` so that they appear under their final
    name only complete. Local: a copy under a temporary name, fsync, rename. Object store: upload under a temporary
    key, then a server-side copy to the final key (which the store makes visible whole), then the temporary key
    removed."""
    name = rel.rsplit("/", 1)[-1]
    parent = rel[: -len(name)]
    tmp_rel = f"{parent}.{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if store.local:
        final, tmp = Path(store.path(rel)), Path(store.path(tmp_rel))
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            _remove(final)  # left by a crash between rename and manifest: not part of the cache
            shutil.copytree(local, tmp) if local.is_dir() else shutil.copyfile(local, tmp)
            _fsync_tree(tmp)
            os.rename(tmp, final)
            fsync_dir(final.parent)
        except OSError as e:
            for leftover in (tmp, final):
                with contextlib.suppress(OSError):
                    _remove(leftover)
            raise CacheError(f"{final}: could not write shard ({e.strerror or e})") from None
        return
    single = len(files) == 1 and files[0].path == ""
    try:
        for f in files:
            src = local if single else local / f.path
            store.fs.put_file(str(src), store.path(f"{tmp_rel}/{f.path}" if f.path else tmp_rel))
        store.remove(rel)  # left by a crash between copy and manifest: not part of the cache
        for f in files:
            suffix = f"/{f.path}" if f.path else ""
            store.fs.copy(store.path(tmp_rel + suffix), store.path(rel + suffix))
    except Exception as e:
        with contextlib.suppress(Exception):
            store.remove(rel)
        raise CacheError(f"{store.name(rel)}: could not write shard ({describe_error(e)})") from None
    finally:
        with contextlib.suppress(Exception):
            store.remove(tmp_rel)


def _write_remote_shard(store: Store, rel: str, split: str, block: SeqBlock, fields: dict[str, FieldSpec],
                        backend: str) -> ShardEntry:
    with tempfile.TemporaryDirectory(prefix="kdcache-shard-") as tmpdir:
        local = Path(tmpdir) / rel.rsplit("/", 1)[-1]
        try:
            block = write_shard_files(local, block, fields, backend)
            files, sha = shard_files(local)
        except OSError as e:
            raise CacheError(f"{local}: could not stage shard {rel} for upload ({e.strerror or e})") from None
        place_shard(store, rel, local, files)
    return _entry(rel, split, block, fields, files, sha)


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
