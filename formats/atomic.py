"""Atomic local writes: a file appears complete under its name or not at all, readable by other users.

Used for caches' manifests and cards, checkpoints and student folders (anything handed to someone else)."""

from __future__ import annotations

import os
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def shared_mode(directory: bool = False) -> int:
    """0644 for a file, 0755 for a folder, less what the umask takes away (mkstemp/mkdtemp make 0600/0700)."""
    return (0o777 if directory else 0o666) & ~_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same directory, fsync, rename: readers see old or new, never half.
    The file gets the mode a plain open() would give it (0644 under the usual umask)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # the umask applies, as for open()
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temp file behind
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def share_tree(path: Path) -> None:
    """Give `path` (a folder, recursively, or a file) the modes a plain open()/mkdir() would: 0644 / 0755 under the
    usual umask. safetensors and mkstemp/mkdtemp create 0600 / 0700, which another user cannot read."""
    path = Path(path)
    if path.is_file():
        os.chmod(path, shared_mode())
        return
    os.chmod(path, shared_mode(directory=True))
    for dirpath, dirnames, filenames in os.walk(path):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), shared_mode(directory=True))
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), shared_mode())
