"""A teacher's portable identity: the manifest's `teacher.fingerprint` (SPEC.md, Manifest), computed here so the
builder records it and the trainer finds the teacher by it on another machine, wherever its folder lives."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from formats.errors import CacheError
from formats.home import kdcache_home

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SEARCH_ENV = "KDCACHE_TEACHER_PATH"  # folders (os.pathsep-separated) that hold teacher folders, or are one


def fingerprint_weights(folder: str | os.PathLike) -> str:
    """sha256 over config.json and every weight file's name, size and first and last 4 MiB.

    Hashing every byte of a 140 GB teacher takes many minutes; this fingerprint changes whenever a file
    is replaced, resized or re-quantized, and is recorded as such in the manifest (fingerprint_method).
    """
    folder = Path(folder)
    h = hashlib.sha256()
    cfg = folder / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    for path in sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        size = path.stat().st_size
        h.update(f"{path.name}\t{size}\n".encode())
        with open(path, "rb") as f:
            h.update(f.read(4 << 20))
            if size > 8 << 20:
                f.seek(size - (4 << 20))
                h.update(f.read())
    return h.hexdigest()


def search_folders() -> list[Path]:
    """Where teachers are looked for: each folder of $KDCACHE_TEACHER_PATH, then the kdcache home's teachers/
    (where the converted default teacher lives)."""
    listed = [Path(p).expanduser() for p in os.environ.get(SEARCH_ENV, "").split(os.pathsep) if p]
    return listed + [kdcache_home() / "teachers"]


def _candidates(info: dict) -> list[Path]:
    out = [Path(info["path"])] if info.get("path") else []
    for folder in search_folders():
        out.append(folder)
        if folder.is_dir():
            out += sorted(p for p in folder.iterdir() if p.is_dir())
    return out


def find_teacher(info: dict) -> Path:
    """The folder of the teacher a manifest's `teacher` section names: the first candidate (the builder's path,
    then the search folders and their subfolders) with a config.json and the recorded fingerprint. Refuses in
    one line, saying where to put the teacher, when none has it."""
    want = info.get("fingerprint")
    for folder in _candidates(info):
        if (folder / "config.json").is_file() and (not want or fingerprint_weights(folder) == want):
            return folder
    name = info.get("name") or "?"
    raise CacheError(f"the cache's teacher {name!r} (fingerprint {str(want)[:16]}) is not at {info.get('path')!r} "
                     f"nor in {', '.join(str(p) for p in search_folders())}: put its folder in one of these or list its "
                     f"parent in ${SEARCH_ENV}")
