"""The manifest: what a cache holds and where, checked before any shard is touched (SPEC.md, Manifest)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from formats.errors import CacheError
from formats.schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_SHARD_SEQUENCES,
    MAX_SHARD_TOKENS,
    MAX_VOCAB,
    READABLE_MAJOR,
    FieldSpec,
    check_field_table,
    top_k_of,
    topk_encoding_of,
)

MANIFEST_NAME = "manifest.json"
BACKENDS = ("parquet", "zarr")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# Manifests are small; a huge one is an attack or a mistake, refused before json parses it.
MAX_MANIFEST_BYTES = 256 * 2**20


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the shard path; "" for a single-file shard
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardEntry:
    path: str  # relative to the cache root, "/"-separated
    split: str
    sequences: int
    tokens: int
    bytes: int
    sha256: str
    files: tuple[FileEntry, ...]
    content_sha256: str

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "split": self.split,
            "sequences": self.sequences,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "files": [{"path": f.path, "bytes": f.bytes, "sha256": f.sha256} for f in self.files],
            "content_sha256": self.content_sha256,
        }


@dataclass
class Manifest:
    backend: str
    fields: dict[str, FieldSpec]
    teacher: dict
    tokenizer: dict
    build: dict
    corpus: dict
    shards: list[ShardEntry] = field(default_factory=list)
    complete: bool = False
    format_version: str = FORMAT_VERSION
    created_by: str = ""
    extra: dict = field(default_factory=dict)  # unknown top-level keys, kept on rewrite

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer["vocab_size"])

    @property
    def top_k(self) -> int:
        return top_k_of(self.fields)

    @property
    def sample_draws(self) -> int:
        return int(self.build.get("sample_draws", 0) or 0)

    def split_shards(self, split: str | None) -> list[ShardEntry]:
        return [s for s in self.shards if split is None or s.split == split]

    def splits(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for s in self.shards:
            d = out.setdefault(s.split, {"sequences": 0, "tokens": 0, "shards": 0})
            d["sequences"] += s.sequences
            d["tokens"] += s.tokens
            d["shards"] += 1
        return out

    def totals(self) -> dict:
        return {
            "sequences": sum(s.sequences for s in self.shards),
            "tokens": sum(s.tokens for s in self.shards),
            "bytes": sum(s.bytes for s in self.shards),
            "shards": len(self.shards),
        }

    def to_json(self) -> dict:
        out = dict(self.extra)
        out.update(
            {
                "format": FORMAT_NAME,
                "format_version": self.format_version,
                "complete": self.complete,
                "backend": self.backend,
                "created_by": self.created_by,
                "teacher": self.teacher,
                "tokenizer": self.tokenizer,
                "build": self.build,
                "corpus": self.corpus,
                "fields": {name: spec.to_json() for name, spec in self.fields.items()},
                "splits": self.splits(),
                "totals": self.totals(),
                "shards": [s.to_json() for s in self.shards],
            }
        )
        return out


def check_relative_path(path: object, where: str) -> str:
    """A manifest path must stay inside the cache: relative, '/'-separated, no '..', no scheme."""
    if not isinstance(path, str) or not path:
        raise CacheError(f"{where}: path must be a non-empty string, got {path!r}")
    if "\\" in path or "\x00" in path or ":" in path:
        raise CacheError(f"{where}: path {path!r} must be a plain relative path (no '\\', ':' or NUL)")
    if path.startswith("/") or path.startswith("~"):
        raise CacheError(f"{where}: path {path!r} is absolute; shard paths must be relative to the cache")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise CacheError(f"{where}: path {path!r} has an empty, '.' or '..' segment")
    return path


def check_inside(root: str, path: str, where: str) -> None:
    """On a local cache, refuse a shard path that resolves (through symlinks) outside the cache root."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([real_root, real]) != real_root:
        raise CacheError(f"{where}: path {path!r} resolves outside the cache (to {real})")


def _int(obj: dict, key: str, where: str, lo: int = 0, hi: int = 2**62) -> int:
    v = obj.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise CacheError(f"{where}: {key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _hex(obj: dict, key: str, where: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not _HEX64.match(v):
        raise CacheError(f"{where}: {key} must be a lowercase hex sha256, got {v!r}")
    return v


def _shard_from_json(i: int, obj: object) -> ShardEntry:
    where = f"manifest shards[{i}]"
    if not isinstance(obj, dict):
        raise CacheError(f"{where}: expected an object")
    path = check_relative_path(obj.get("path"), where)
    where = f"manifest shard {path!r}"
    split = obj.get("split")
    if not isinstance(split, str) or not re.match(r"^[A-Za-z0-9_-]{1,64}$", split):
        raise CacheError(f"{where}: split must be a short name, got {split!r}")
    files_obj = obj.get("files")
    if not isinstance(files_obj, list) or not files_obj or len(files_obj) > 100_000:
        raise CacheError(f"{where}: files must be a non-empty list")
    files = []
    for f in files_obj:
        if not isinstance(f, dict):
            raise CacheError(f"{where}: files entries must be objects")
        fpath = f.get("path")
        if fpath != "":
            check_relative_path(fpath, where)
        files.append(FileEntry(fpath, _int(f, "bytes", where), _hex(f, "sha256", where)))
    entry = ShardEntry(
        path=path,
        split=split,
        sequences=_int(obj, "sequences", where, 0, MAX_SHARD_SEQUENCES),
        tokens=_int(obj, "tokens", where, 0, MAX_SHARD_TOKENS),
        bytes=_int(obj, "bytes", where),
        sha256=_hex(obj, "sha256", where),
        files=tuple(files),
        content_sha256=_hex(obj, "content_sha256", where),
    )
    if entry.bytes != sum(f.bytes for f in files):
        raise CacheError(f"{where}: bytes {entry.bytes} is not the sum of its files' sizes")
    if entry.tokens > entry.bytes:
        raise CacheError(f"{where}: claims {entry.tokens} tokens in {entry.bytes} bytes, which cannot be")
    if entry.sequences > entry.tokens:
        raise CacheError(f"{where}: claims more sequences ({entry.sequences}) than tokens ({entry.tokens})")
    return entry


def manifest_from_json(obj: object, where: str = MANIFEST_NAME) -> Manifest:
    """Validate a parsed manifest: format and major version first, then everything a reader relies on."""
    if not isinstance(obj, dict):
        raise CacheError(f"{where}: expected a JSON object")
    if obj.get("format") != FORMAT_NAME:
        raise CacheError(f"{where}: format is {obj.get('format')!r}, expected {FORMAT_NAME!r}")
    version = obj.get("format_version")
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)$", version) if isinstance(version, str) else None
    if not m:
        raise CacheError(f"{where}: format_version {version!r} is not a semantic version")
    if int(m.group(1)) != READABLE_MAJOR:
        raise CacheError(
            f"{where}: cache format version {version} is not supported; "
            f"this build of kdcache reads format {READABLE_MAJOR}.x"
        )
    backend = obj.get("backend")
    if backend not in BACKENDS:
        raise CacheError(f"{where}: backend must be one of {BACKENDS}, got {backend!r}")
    for key in ("teacher", "tokenizer", "build", "corpus", "fields"):
        if not isinstance(obj.get(key), dict):
            raise CacheError(f"{where}: {key} must be an object")
    fields = {name: FieldSpec.from_json(name, spec) for name, spec in obj["fields"].items()}
    check_field_table(fields)
    vocab = _int(obj["tokenizer"], "vocab_size", f"{where} tokenizer", 1, MAX_VOCAB)
    encoding = topk_encoding_of(fields)
    if encoding is not None and 256**encoding.rank_bytes < vocab:
        raise CacheError(f"{where}: the compact top-k's {encoding.rank_bytes} rank bytes cannot hold ranks of a "
                         f"{vocab}-id vocabulary")
    _int(obj["build"], "top_k", f"{where} build", 0)
    if obj["build"]["top_k"] != top_k_of(fields):
        raise CacheError(f"{where}: build.top_k disagrees with the shape of topk_ids")
    if "sample_ids" in fields:
        draws = _int(obj["build"], "sample_draws", f"{where} build", 1, 2**16 - 1)
        if fields["sample_counts"].dtype == "U8" and draws > 255:
            raise CacheError(f"{where}: sample_draws {draws} does not fit U8 sample_counts")
    if not isinstance(obj.get("complete"), bool):
        raise CacheError(f"{where}: complete must be true or false")
    shards_obj = obj.get("shards")
    if not isinstance(shards_obj, list):
        raise CacheError(f"{where}: shards must be a list")
    shards = [_shard_from_json(i, s) for i, s in enumerate(shards_obj)]
    if len({s.path for s in shards}) != len(shards):
        raise CacheError(f"{where}: a shard path appears twice")
    parts = obj.get("parts", [])
    if not isinstance(parts, list):
        raise CacheError(f"{where}: parts must be a list of folders")
    for part in parts:
        check_relative_path(part, f"{where} parts")
    known = {"format", "format_version", "complete", "backend", "created_by", "teacher", "tokenizer",
             "build", "corpus", "fields", "splits", "totals", "shards"}
    man = Manifest(
        backend=backend,
        fields=fields,
        teacher=obj["teacher"],
        tokenizer=obj["tokenizer"],
        build=obj["build"],
        corpus=obj["corpus"],
        shards=shards,
        complete=obj["complete"],
        format_version=version,
        created_by=str(obj.get("created_by", "")),
        extra={k: v for k, v in obj.items() if k not in known},
    )
    if obj.get("splits") != man.splits():
        raise CacheError(f"{where}: splits {obj.get('splits')} disagree with the shard list {man.splits()}")
    if obj.get("totals") != man.totals():
        raise CacheError(f"{where}: totals {obj.get('totals')} disagree with the shard list {man.totals()}")
    return man


def parse_manifest(data: bytes, where: str = MANIFEST_NAME) -> Manifest:
    if len(data) > MAX_MANIFEST_BYTES:
        raise CacheError(f"{where}: {len(data)} bytes is too large for a manifest")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{where}: not valid JSON ({e})") from None
    return manifest_from_json(obj, where)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same directory, fsync, rename: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
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


def write_manifest(root: Path, manifest: Manifest) -> None:
    data = json.dumps(manifest.to_json(), indent=1, sort_keys=False).encode() + b"\n"
    atomic_write_bytes(Path(root) / MANIFEST_NAME, data)
