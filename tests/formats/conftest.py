"""Shared fixtures for the format tests: small real caches written by CacheWriter from synthetic sequences."""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from formats.manifest import Manifest
from formats.schema import FieldSpec
from tests.formats.synth import BACKENDS, make_sequences, rich_fields, write_cache


@dataclass
class SmallCache:
    root: Path
    backend: str
    fields: dict[str, FieldSpec]
    items: list[tuple[str, dict]]  # (split, sequence) in the order they were added; do not modify
    manifest: Manifest


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def _small_cache_template(tmp_path_factory):
    """backend -> SmallCache, written by CacheWriter at most once per backend and session."""
    made: dict[str, SmallCache] = {}

    def get(backend: str) -> SmallCache:
        if backend not in made:
            fields = rich_fields()
            seqs = make_sequences([10, 10, 12, 8, 6], fields)
            items = [("train", s) for s in seqs[:4]] + [("heldout", seqs[4])]
            root = tmp_path_factory.mktemp(f"small-cache-{backend}") / "cache"
            made[backend] = SmallCache(root, backend, fields, items, write_cache(root, backend, items, fields))
        return made[backend]

    return get


@pytest.fixture
def small_cache(tmp_path: Path, backend: str, _small_cache_template) -> SmallCache:
    """A valid finished cache with every field: train in two shards (2 x 20 tokens), heldout in one.

    The session's template copied byte for byte into the test's own directory (Zarr writes are slow;
    the copy is the same cache), so a test may damage it freely.
    """
    template = _small_cache_template(backend)
    shutil.copytree(template.root, tmp_path / "cache", symlinks=True)
    return SmallCache(tmp_path / "cache", backend, template.fields, template.items, copy.deepcopy(template.manifest))
