"""Shared fixtures for the format tests: small real caches written by CacheWriter from synthetic sequences."""

from __future__ import annotations

import copy
import functools
import http.server
import json
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from formats.manifest import Manifest
from formats.schema import FieldSpec
from tests.formats.remote import S3, QuietHandler, RangeHandler, s3_options
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


# ----------------------------------------------------------------------------- remote stores on loopback

@pytest.fixture
def s3(moto_endpoint, monkeypatch, tmp_path) -> S3:
    """A fresh bucket on the loopback S3 server; this process's storage options reach it, and its shard cache is
    the test's own."""
    options = s3_options(moto_endpoint)
    monkeypatch.setenv("KDCACHE_STORAGE_OPTIONS", json.dumps(options))
    monkeypatch.setenv("KDCACHE_SHARD_CACHE", str(tmp_path / "shard-cache"))
    bucket = f"kdcache-{uuid.uuid4().hex[:12]}"
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    fs.mkdir(bucket)
    return S3(f"s3://{bucket}", fs, options)


@pytest.fixture
def http_server():
    """start(folder, ranges) -> base URL of a server on 127.0.0.1 serving `folder`: `http.server`'s own handler
    (no Range support: every GET answers the whole file) or one that answers Range requests with 206. Stopped at
    the end of the test."""
    servers = []

    def start(folder: Path, ranges: bool) -> str:
        handler = functools.partial(RangeHandler if ranges else QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
