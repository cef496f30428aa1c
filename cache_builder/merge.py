"""`kdcache merge`: one cache from the parts of a multi-node build, without copying shard data.

The merged manifest names the parts' shards by paths relative to the merged folder, so every part must
live inside it (e.g. build with `--out CACHE/part-0 --part 0`, ...; then `kdcache merge CACHE CACHE/part-*`).
Part p of P computed shard groups p, p + P, p + 2P, ... of each split (`groups.part_index`), so listing the
parts' shards round-robin restores the order of a one-part build: the merged cache has its content checksums,
shard for shard.
"""

from __future__ import annotations

import copy
import os
from importlib.metadata import version
from pathlib import Path

from cache_builder.errors import BuildError
from formats.card import render_card
from formats.manifest import MANIFEST_NAME, Manifest, ShardEntry, atomic_write_bytes, parse_manifest, write_manifest

# Build settings that legitimately differ between parts.
PER_PART = ("part",)


def merge_parts(out: str | os.PathLike, parts: list[str]) -> Manifest:
    root = Path(out).resolve()
    loaded: list[tuple[str, Manifest]] = []
    for part in parts:
        real = Path(part).resolve()
        if os.path.commonpath([root, real]) != str(root) or real == root:
            raise BuildError(f"merge: part {part!r} is not a folder inside {out!r}; move it there first")
        path = real / MANIFEST_NAME
        if not path.exists():
            raise BuildError(f"merge: part {part!r} has no {MANIFEST_NAME}")
        m = parse_manifest(path.read_bytes(), str(path))
        if not m.complete:
            raise BuildError(f"merge: part {part!r} is incomplete; finish its build first")
        loaded.append((real.relative_to(root).as_posix(), m))
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
    atomic_write_bytes(root / "README.md", render_card(merged).encode())
    write_manifest(root, merged)
    return merged
