"""Caches in an object store (moto's S3 server on loopback) and behind HTTP servers with and without Range
support: written, resumed, locked, converted, read, verified, through the shard cache. No mock: the real s3fs,
fsspec HTTP and servers."""

from __future__ import annotations

import json
import os
import socket
import time

import numpy as np
import pytest

from formats import shard_cache
from formats.convert import convert_cache
from formats.copy import copy_cache
from formats.errors import CacheError
from formats.lock import STALE_S, lock_is_live
from formats.reader import open_cache
from formats.store import check_writable
from formats.verify import verify_cache
from formats.writer import CacheWriter
from tests.formats.synth import VOCAB, ShardCutter, make_manifest, same_bytes, write_cache


def _sequences(cache) -> list[dict]:
    return [cache.sequence(i) for i in range(cache.num_sequences())]


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(same_bytes(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_a_cache_written_to_s3_reads_and_verifies_like_the_same_cache_written_locally(s3, small_cache, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = f"{s3.url}/caches/c"
    m = write_cache(url, small_cache.backend, small_cache.items, small_cache.fields)
    assert [s.to_json() for s in m.shards] == [s.to_json() for s in small_cache.manifest.shards]
    assert sorted(p.split("/", 3)[3] for p in s3.fs.find(url)) == sorted(
        ["manifest.json", "README.md"] + [f"{s.path}/{f.path}".rstrip("/") for s in m.shards for f in s.files])
    assert _same(_sequences(open_cache(url)), _sequences(open_cache(small_cache.root)))
    assert verify_cache(url) == []
    assert sorted(os.listdir(tmp_path)) == ["cache", "shard-cache"]  # no folder "s3:"


def test_outputs_that_cannot_be_written_are_refused_in_one_line(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for url, says in [("http://127.0.0.1:9/c", "read-only"),
                      ("s3://kdcache-no-such-bucket/c", "cannot write a cache here"),
                      ("s3:/bucket/c", "lost a '/' after its scheme"),
                      ("nosuchscheme://x/c", "cannot open this URL")]:
        with pytest.raises(CacheError, match=says) as e:
            check_writable(url)
        assert "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []  # never a local folder named after a URL
    check_writable(f"{s3.url}/ok")
    assert s3.fs.find(s3.url) == []  # the probe object is gone


def test_a_second_writer_is_refused_by_the_lock_object_even_with_overwrite(s3, small_cache):
    url = f"{s3.url}/c"
    manifest = make_manifest(small_cache.backend, small_cache.fields, VOCAB, 16)
    with CacheWriter(url, manifest, 20):
        lock = json.loads(s3.fs.cat_file(f"{url[5:]}/.lock"))
        assert {"owner", "host", "pid", "heartbeat", "started", "token"} <= set(lock)
        for overwrite in (False, True):
            with pytest.raises(CacheError, match=r"\.lock: another writer holds this cache"):
                CacheWriter(url, manifest, 20, overwrite=overwrite)
    assert not s3.fs.exists(f"{url[5:]}/.lock")  # released
    CacheWriter(url, manifest, 20).close()


def test_a_stale_lock_object_is_taken_over(s3, small_cache):
    url = f"{s3.url}/c"
    now = time.time()
    host = socket.gethostname()
    assert lock_is_live({"host": host, "pid": os.getpid(), "heartbeat": now})
    assert not lock_is_live({"host": host, "pid": os.getpid(), "heartbeat": now - STALE_S - 1})  # no heartbeat
    assert lock_is_live({"host": "elsewhere", "pid": 2**22 + 7, "heartbeat": now})
    dead = 2**22 + 7  # above pid_max's default: no such process here
    assert not lock_is_live({"host": host, "pid": dead, "heartbeat": now})  # killed on this host
    s3.fs.pipe_file(f"{url[5:]}/.lock", json.dumps({"host": host, "pid": dead, "heartbeat": now}).encode())
    CacheWriter(url, make_manifest(small_cache.backend, small_cache.fields, VOCAB, 16), 20).close()


def test_an_interrupted_s3_write_resumes_from_the_published_manifest_to_the_same_shards(s3, small_cache):
    url = f"{s3.url}/c"
    manifest = make_manifest(small_cache.backend, small_cache.fields, VOCAB, 16)
    w = ShardCutter(CacheWriter(url, manifest, 20))
    for split, seq in small_cache.items[:3]:
        w.add(split, seq)
    w.close()  # died after publishing one shard; now leave what a kill between upload and manifest leaves
    leftover = f"{url[5:]}/shards/.train-00001.{small_cache.backend}.tmp-1-deadbeef"
    s3.fs.pipe_file(leftover + ("/zarr.json" if small_cache.backend == "zarr" else ""), b"half")
    s3.fs.pipe_file(f"{url[5:]}/shards/train-00001.{small_cache.backend}" + ("/zarr.json" if small_cache.backend == "zarr" else ""), b"x")
    with ShardCutter(CacheWriter(url, make_manifest(small_cache.backend, small_cache.fields, VOCAB, 16), 20)) as w:
        assert w.done_sequences("train") == 2
        assert not s3.fs.exists(leftover)
        done = 0
        for split, seq in small_cache.items:
            if split == "train" and done < 2:
                done += 1
                continue
            w.add(split, seq)
        m = w.finish()
    assert [s.to_json() for s in m.shards] == [s.to_json() for s in small_cache.manifest.shards]
    assert verify_cache(url) == []


def test_convert_reads_s3_and_writes_s3_with_the_same_content_checksums(s3, small_cache):
    src, out = f"{s3.url}/src", f"{s3.url}/out"
    write_cache(src, small_cache.backend, small_cache.items, small_cache.fields)
    other = "zarr" if small_cache.backend == "parquet" else "parquet"
    m = convert_cache(src, other, out)
    assert [s.content_sha256 for s in m.shards] == [s.content_sha256 for s in small_cache.manifest.shards]
    assert open_cache(out).manifest.backend == other and verify_cache(out) == []
    with pytest.raises(CacheError, match="never writes over what it reads"):
        convert_cache(src, other, src + "/")


@pytest.mark.parametrize("ranges", [False, True], ids=["no-range", "range"])
def test_a_cache_behind_an_http_server_reads_and_verifies(small_cache, http_server, ranges, tmp_path, monkeypatch):
    monkeypatch.setenv("KDCACHE_SHARD_CACHE", str(tmp_path / "shard-cache"))
    base = http_server(small_cache.root.parent, ranges)
    url = f"{base}/cache"
    assert verify_cache(url) == []
    cache = open_cache(url, require_complete=True)
    cache.check_structure()
    assert _same(_sequences(cache), _sequences(open_cache(small_cache.root)))
    blocks = list(cache.iter_blocks("train"))
    assert sum(b.num_tokens for b in blocks) == small_cache.manifest.splits()["train"]["tokens"]


def test_a_damaged_remote_shard_is_refused_on_download_and_reported_by_verify(small_cache, http_server, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("KDCACHE_SHARD_CACHE", str(tmp_path / "shard-cache"))
    entry = small_cache.manifest.shards[0]
    f = entry.files[-1]
    path = small_cache.root / entry.path / f.path if f.path else small_cache.root / entry.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    url = f"{http_server(small_cache.root.parent, False)}/cache"
    assert any("sha256 mismatch" in p for p in verify_cache(url))
    with pytest.raises(CacheError, match="sha256 mismatch"):
        open_cache(url).open_shard(entry)
    assert not (tmp_path / "shard-cache" / entry.sha256[:2] / entry.sha256).exists()  # nothing unchecked is kept


def test_the_shard_cache_is_reused_by_later_runs_and_keeps_its_bound(s3, small_cache, monkeypatch):
    url = f"{s3.url}/c"
    write_cache(url, small_cache.backend, small_cache.items, small_cache.fields)
    cache = open_cache(url)
    first = cache.local_path(cache.shards()[0])
    s3.fs.rm(f"{url[5:]}/shards", recursive=True)  # a later run finds every shard it read in the shard cache
    again = open_cache(url)
    assert again.local_path(cache.shards()[0]) == first
    assert np.array_equal(again.read_shard(cache.shards()[0]).token["input_ids"],
                          open_cache(small_cache.root).read_shard(cache.shards()[0]).token["input_ids"])
    shard_cache._recent.clear()
    shard_cache.evict(limit=0)  # least recently used first, down to the bound
    assert not os.path.exists(first)


def test_copy_round_trips_local_s3_local_with_identical_checksums_and_resumes(s3, small_cache, tmp_path):
    url, back = f"{s3.url}/mirror", tmp_path / "back"
    copy_cache(small_cache.root, url)
    copy_cache(url, back)
    want = [s.to_json() for s in small_cache.manifest.shards]
    assert [s.to_json() for s in open_cache(url).manifest.shards] == want
    assert [s.to_json() for s in open_cache(back).manifest.shards] == want
    assert verify_cache(url) == [] and verify_cache(str(back)) == []
    # Stopped after one shard: the copy resumes and publishes the rest; the manifest came last each time.
    partial = f"{s3.url}/partial"
    copy_cache(small_cache.root, partial)
    m = json.loads(s3.fs.cat_file(f"{partial[5:]}/manifest.json"))
    m["shards"], m["complete"] = m["shards"][:1], False
    m["splits"] = {"train": {"sequences": m["shards"][0]["sequences"], "tokens": m["shards"][0]["tokens"], "shards": 1}}
    m["totals"] = {"sequences": m["shards"][0]["sequences"], "tokens": m["shards"][0]["tokens"],
                   "bytes": m["shards"][0]["bytes"], "shards": 1}
    s3.fs.pipe_file(f"{partial[5:]}/manifest.json", json.dumps(m).encode())
    assert [s.to_json() for s in copy_cache(small_cache.root, partial).shards] == want
    assert verify_cache(partial) == []
    with pytest.raises(CacheError, match="never writes over what it reads"):
        copy_cache(url, url)


def test_merge_writes_the_merged_manifest_into_the_object_store(s3, small_cache):
    from cache_builder.merge import merge_parts

    parts = []
    for i in range(2):
        manifest = make_manifest(small_cache.backend, small_cache.fields, VOCAB, 16)
        manifest.build.update(num_parts=2, part=i)
        part = f"{s3.url}/merged/part-{i}"
        with ShardCutter(CacheWriter(part, manifest, 20)) as w:
            for split, seq in small_cache.items:
                w.add(split, seq)
            w.finish()
        parts.append(part)
    merged = merge_parts(f"{s3.url}/merged", parts)
    first = small_cache.manifest.shards[0].path  # the parts' shards round-robin: a one-part build's order
    assert [s.path for s in merged.shards][:2] == [f"part-0/{first}", f"part-1/{first}"]
    assert verify_cache(f"{s3.url}/merged") == []
    assert open_cache(f"{s3.url}/merged").num_sequences() == 2 * len(small_cache.items)


def test_build_refuses_an_output_it_cannot_write_before_it_looks_at_the_teacher(s3, tmp_path, monkeypatch):
    from cache_builder.build import run_build
    from cache_builder.settings import BuildSettings

    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("some text " * 20)
    for out, says in [("s3://kdcache-no-such-bucket/c", "kdcache-no-such-bucket/c: cannot write a cache here"),
                      ("https://127.0.0.1:9/c", "read-only"), ("s3:/bucket/c", "lost a '/'")]:
        s = BuildSettings(teacher=str(tmp_path / "no-teacher-here"), corpus=[str(tmp_path / "corpus.txt")], out=out,
                          progress=False)
        with pytest.raises(CacheError, match=says):
            run_build(s)
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt"]
