"""Corpus sources: the paths, directories and globs a user gives -> the files to read, and their fingerprint.

Directories are walked recursively in sorted order and globs expanded; hidden files are skipped, and so are
files of other types met in a directory or glob (listed in `CorpusStats.ignored_files`), while a file named
explicitly must be of a known type. A `datasets` folder (written by `save_to_disk`) is one source.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import stat
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
        found[_regular_file(p)] = kind
        return 1
    if named:
        # A file named on purpose must be read; in a directory or glob, READMEs and the like are skipped.
        raise BuildError(f"{p}: unknown corpus file type {p.suffix or '(no extension)'!r}; expected "
                         f"{', '.join(SUFFIXES)} or a datasets folder")
    stats.ignored_files.append(str(p))
    return 0


def _regular_file(p: Path) -> Path:
    """`p` with symlinks resolved, if it is a regular file: reading a FIFO or a device would wait forever, and a
    symlink loop or a dangling link has nothing to read."""
    try:
        real = p.resolve(strict=True)
    except RuntimeError:  # Python 3.11 raises this for a symlink loop
        raise BuildError(f"{p}: a symlink loop; remove it or point --corpus elsewhere") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BuildError(f"{p}: a symlink loop; remove it or point --corpus elsewhere") from None
        raise BuildError(f"{p}: cannot be read ({'a dangling symlink' if p.is_symlink() else e.strerror})") from None
    if not real.is_file():
        what = "a FIFO" if stat.S_ISFIFO(real.stat().st_mode) else "not a regular file"
        raise BuildError(f"{p}: {what}; kdcache reads only regular files (reading it could wait forever)")
    return real


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


def source_files(kind: str, path: Path) -> list[tuple[Path, str]]:
    """(file, name) of each file a source reads: the file itself, or a datasets folder's arrow files named
    `folder/file`. The name, not the directory, enters fingerprints and document ids."""
    if kind == "datasets":
        return [(f, f"{path.name}/{f.name}") for f in datasets_arrow_files(path)]
    return [(path, path.name)]


class CorpusFingerprint:
    """The manifest's `corpus` section, made while the corpus streams (SPEC.md, `corpus`).

    Up front, from the file system alone: every file's name and size (`listing_sha256`). Each file's content
    hash is taken when the stream reaches it (`read`), and the fingerprint (`sha256`) once every file has
    been hashed (`finish`). A build resumed on a cache whose listing matches adopts the hashes recorded so
    far, and `read` then refuses a file whose content changed since.
    """

    def __init__(self, opts: CorpusOptions):
        check_options(opts)
        self.opts = opts
        self.files: list[tuple[Path, str]] = []
        self.by_source: dict[Path, list[int]] = {}
        for kind, path in resolve_sources(opts.paths):
            for f, name in source_files(kind, path):
                self.by_source.setdefault(path, []).append(len(self.files))
                self.files.append((f, name))
        sources = [{"path": str(f), "bytes": f.stat().st_size, "sha256": None} for f, _ in self.files]
        listing = {"text_field": opts.text_field, "txt_split": opts.txt_split,
                   "files": [[name, e["bytes"]] for (_, name), e in zip(self.files, sources)]}
        # Only values are replaced from here on (never keys added), so a manifest written from another thread
        # while the stream runs always serialises a consistent section.
        self.section = {"listing_sha256": _sha256_json(listing), "sources": sources, "sha256": None}
        self.bytes_read = 0

    @property
    def total_bytes(self) -> int:
        return sum(e["bytes"] for e in self.section["sources"])

    def adopt(self, previous: dict) -> bool:
        """Take the content hashes `previous` (an earlier build's corpus section) recorded, if its listing is this
        one; `read` then checks each file against them."""
        if previous.get("listing_sha256") != self.section["listing_sha256"]:
            return False
        for mine, theirs in zip(self.section["sources"], previous.get("sources", [])):
            mine["sha256"] = theirs.get("sha256")
        self.section["sha256"] = previous.get("sha256")
        return True

    def read(self, source: Path) -> None:
        """Hash the files of `source` (as `resolve_sources` gave it) as the stream reaches it."""
        for i in self.by_source[source]:
            self._hash(i)

    def hash_all(self) -> None:
        for i in range(len(self.files)):
            self._hash(i)

    def _hash(self, i: int) -> None:
        (path, _), entry = self.files[i], self.section["sources"][i]
        try:
            size, digest = path.stat().st_size, _file_sha256(path)
        except OSError as e:
            raise BuildError(f"{path}: cannot read corpus file ({e.strerror or e})") from None
        if size != entry["bytes"]:
            raise BuildError(f"{path}: corpus file changed while the build ran ({entry['bytes']} bytes when the "
                             f"corpus was listed, {size} now)")
        if entry["sha256"] is not None and entry["sha256"] != digest:
            raise BuildError(f"{path}: corpus file changed since this cache was built from it (same size, other "
                             "content); use --overwrite to rebuild")
        entry["sha256"] = digest
        self.bytes_read += size

    def finish(self) -> dict:
        """The section with its fingerprint, once every file has been read."""
        missing = [str(f) for (f, _), e in zip(self.files, self.section["sources"]) if e["sha256"] is None]
        if missing:
            raise BuildError(f"corpus: {len(missing)} file(s) were never read, e.g. {missing[0]}")
        combined = {"text_field": self.opts.text_field, "txt_split": self.opts.txt_split,
                    "files": [[name, e["bytes"], e["sha256"]] for (_, name), e in zip(self.files, self.section["sources"])]}
        self.section["sha256"] = _sha256_json(combined)
        return self.section


def corpus_fingerprint(opts: CorpusOptions) -> dict:
    """The `corpus` section of a finished build, made by hashing every file now: `{"listing_sha256", "sources":
    [{"path", "bytes", "sha256"}], "sha256"}`.

    `sha256` covers the options that change documents (text_field, txt_split) and, per file in order, its
    name (doc ids contain it), size and content hash; not its directory, so a corpus moved to another
    machine keeps its fingerprint.
    """
    fp = CorpusFingerprint(opts)
    fp.hash_all()
    return fp.finish()


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, separators=(",", ":")).encode("utf-8")).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
