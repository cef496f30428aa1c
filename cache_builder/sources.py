"""Corpus sources: the paths, directories and globs a user gives -> the files to read, and their fingerprint.

Directories are walked recursively in sorted order and globs expanded; hidden files are skipped, and so are
files of other types met in a directory or glob (listed in `CorpusStats.ignored_files`), while a file named
explicitly must be of a known type. A `datasets` folder (written by `save_to_disk`) is one source.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path

from cache_builder.documents import CorpusOptions, CorpusStats, check_options
from cache_builder.errors import BuildError

SUFFIXES = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}


def resolve_sources(paths: list[str], stats: CorpusStats | None = None) -> list[tuple[str, Path]]:
    """(kind, path) of every source, sorted by path, each once; kind is txt|jsonl|parquet|arrow|datasets."""
    stats = stats if stats is not None else CorpusStats()
    found: dict[Path, str] = {}
    for raw in paths:
        p = Path(raw).expanduser()
        if p.exists():  # checked first: a real file name may contain glob characters
            matches, named = [p], True
        elif any(c in str(raw) for c in "*?["):
            matches, named = [Path(m) for m in sorted(glob.glob(str(p), recursive=True))], False
            if not matches:
                raise BuildError(f"corpus glob {raw!r} matches nothing")
        else:
            raise BuildError(f"corpus path {raw!r}: no such file or directory")
        if sum(_add_source(m, named, found, stats) for m in matches) == 0:
            raise BuildError(f"corpus path {raw!r} holds no corpus files ({', '.join(SUFFIXES)} or a datasets folder)")
    return sorted(((kind, path) for path, kind in found.items()), key=lambda kp: str(kp[1]))


def _add_source(p: Path, named: bool, found: dict[Path, str], stats: CorpusStats) -> int:
    """Add the sources at `p` to `found`; returns how many it holds (counting ones already found)."""
    if not p.is_dir():
        return _add_file(p, named, found, stats)
    if is_datasets_folder(p):
        found[p.resolve()] = "datasets"
        return 1
    n = 0
    for root, dirs, files in os.walk(p):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for d in list(dirs):
            if is_datasets_folder(here / d):
                found[(here / d).resolve()] = "datasets"
                dirs.remove(d)  # its arrow files belong to it
                n += 1
        n += sum(_add_file(here / name, False, found, stats) for name in sorted(files) if not name.startswith("."))
    return n


def _add_file(p: Path, named: bool, found: dict[Path, str], stats: CorpusStats) -> int:
    kind = SUFFIXES.get(p.suffix.lower())
    if kind is not None:
        found[p.resolve()] = kind
        return 1
    if named:
        # A file named on purpose must be read; in a directory or glob, READMEs and the like are skipped.
        raise BuildError(f"{p}: unknown corpus file type {p.suffix or '(no extension)'!r}; expected "
                         f"{', '.join(SUFFIXES)} or a datasets folder")
    stats.ignored_files.append(str(p))
    return 0


def is_datasets_folder(p: Path) -> bool:
    """A folder written by `datasets.Dataset.save_to_disk`."""
    return (p / "state.json").is_file() and (p / "dataset_info.json").is_file()


def datasets_arrow_files(folder: Path) -> list[Path]:
    """The data files of a datasets folder, in the order state.json lists them."""
    try:
        state = json.loads((folder / "state.json").read_text())
        names = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BuildError(f"{folder / 'state.json'}: not a datasets state file ({e})") from None
    files = [folder / n for n in names]
    for f in files:
        if not f.is_file():
            raise BuildError(f"{folder}: state.json lists {f.name!r}, which is missing")
    return files


def corpus_fingerprint(opts: CorpusOptions) -> dict:
    """{"sources": [{"path", "bytes", "sha256"}], "sha256": combined} over every file read.

    The combined hash covers the options that change documents (text_field, txt_split) and, per file in
    order, its name (doc ids contain it), size and content hash; not its directory, so a corpus moved to
    another machine keeps its fingerprint.
    """
    check_options(opts)
    entries = []
    for kind, path in resolve_sources(opts.paths):
        files = datasets_arrow_files(path) if kind == "datasets" else [path]
        for f in files:
            label = f"{path.name}/{f.name}" if kind == "datasets" else f.name
            entries.append({"path": str(f), "name": label, "bytes": f.stat().st_size, "sha256": _file_sha256(f)})
    combined = json.dumps({"text_field": opts.text_field, "txt_split": opts.txt_split,
                           "files": [[e["name"], e["bytes"], e["sha256"]] for e in entries]}, separators=(",", ":"))
    return {"sources": [{"path": e["path"], "bytes": e["bytes"], "sha256": e["sha256"]} for e in entries],
            "sha256": hashlib.sha256(combined.encode("utf-8")).hexdigest()}


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
