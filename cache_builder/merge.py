"""`kdcache merge`: one cache from the parts of a multi-node build, without copying shard data.

The merged manifest names the parts' shards by paths relative to the merged folder, so every part must
live inside it (e.g. build with `--out CACHE/part-0 --part 0`, ...; then `kdcache merge CACHE CACHE/part-*`).
Part p of P computed shard groups p, p + P, p + 2P, ... of each split (`groups.part_index`), so listing the
parts' shards round-robin restores the order of a one-part build: the merged cache has its content checksums,
shard for shard.
CACHE may be a local folder or an object-store URL (s3://bucket/cache with parts s3://bucket/cache/part-0, ...).
"""

from __future__ import annotations

import copy
import os
from importlib.metadata import version
from pathlib import Path

from cache_builder.errors import BuildError
from formats.card import render_card
from formats.manifest import MANIFEST_NAME, Manifest, ShardEntry, manifest_bytes, parse_manifest
from formats.store import Store, describe_error, open_store

# Build settings that legitimately differ between parts.
PER_PART = ("part",)


def _relative(store: Store, part: str, out: str) -> str:
    """The part's folder relative to the merged cache's root; refused unless it lies inside it."""
    inside = None
    if store.local:
        root, real = Path(store.root).resolve(), Path(part).resolve()
        if os.path.commonpath([root, real]) == str(root) and real != root:
            inside = real.relative_to(root).as_posix()
    else:
        other = open_store(part)
        if other.protocol == store.protocol and other.root.startswith(store.root.rstrip("/") + "/"):
            inside = other.root[len(store.root.rstrip("/")) + 1:].rstrip("/")
    if not inside:
        raise BuildError(f"merge: part {part!r} is not a folder inside {out!r}; move it there first")
    return inside


def merge_parts(out: str | os.PathLike, parts: list[str]) -> Manifest:
    out = os.fspath(out)
    store = open_store(out, writing=True)
    loaded: list[tuple[str, Manifest]] = []
    for part in parts:
        rel = _relative(store, part, out)
        try:
            data = store.read_bytes(f"{rel}/{MANIFEST_NAME}")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise BuildError(f"merge: part {part!r} has no {MANIFEST_NAME}") from None
        m = parse_manifest(data, store.name(f"{rel}/{MANIFEST_NAME}"))
        if not m.complete:
            raise BuildError(f"merge: part {part!r} is incomplete; finish its build first")
        loaded.append((rel, m))
    loaded.sort(key=lambda pm: pm[1].build.get("part", 0))
    first_rel, first = loaded[0]
    for rel, m in loaded[1:]:
        for key in ("backend", "fields", "teacher", "tokenizer", "corpus"):
            a, b = first.to_json()[key], m.to_json()[key]
            if a != b:
                raise BuildError(f"merge: parts {first_rel!r} and {rel!r} differ in {key}; they are not parts of one build")
        a = {k: v for k, v in first.build.items() if k not in PER_PART}
        b = {k: v for k, v in m.build.items() if k not in PER_PART}
        if a != b:
            key = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            raise BuildError(f"merge: parts {first_rel!r} and {rel!r} differ in build.{key} ({a.get(key)!r} != {b.get(key)!r})")
    indices = sorted(m.build.get("part", 0) for _, m in loaded)
    expected = list(range(int(first.build.get("num_parts", 1))))
    if indices != expected:
        raise BuildError(f"merge: got parts {indices}, a build with num_parts={len(expected)} needs exactly {expected}")
    build = {k: v for k, v in copy.deepcopy(first.build).items() if k not in PER_PART}
    merged = Manifest(
        backend=first.backend, fields=dict(first.fields), teacher=copy.deepcopy(first.teacher),
        tokenizer=copy.deepcopy(first.tokenizer), build=build, corpus=copy.deepcopy(first.corpus),
        complete=True, created_by=f"kdcache {version('kdcache')}",
        extra={"parts": [rel for rel, _ in loaded]},
    )
    splits = list(dict.fromkeys(s.split for _, m in loaded for s in m.shards))  # part 0's order first
    for split in splits:
        per_part = [[(rel, s) for s in m.shards if s.split == split] for rel, m in loaded]
        for k in range(max(map(len, per_part))):
            for shards in per_part:
                if k < len(shards):
                    rel, s = shards[k]
                    merged.shards.append(ShardEntry(f"{rel}/{s.path}", s.split, s.sequences, s.tokens, s.bytes,
                                                    s.sha256, s.files, s.content_sha256))
    try:  # the card first, the manifest last: the manifest names the merged cache only once all is in place
        store.write_bytes("README.md", render_card(merged).encode())
        store.write_bytes(MANIFEST_NAME, manifest_bytes(merged))
    except OSError:
        raise  # the CLI names a full disk or a forbidden folder in one line
    except Exception as e:
        raise BuildError(f"merge: could not write {store.name(MANIFEST_NAME)} ({describe_error(e)})") from None
    return merged
