"""Builds on a real Ray cluster (issue #14, points 2-4): two Ray nodes on loopback, started once for this module and
shut down after it. A Ray build with 2 or 3 replicas gives the shards of a local build and of a parts build
merged; a one-replica build whose replica is killed with SIGKILL in the middle of a shard is restarted and ends
with the same shards; a killed driver is resumed by the same command; a bad record or a failing shard stops the
build with one line."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from cache_builder.build import run_build
from cache_builder.errors import BuildError
from cache_builder.merge import merge_parts
from cache_builder.settings import BuildSettings
from formats.manifest import MANIFEST_NAME
from formats.reader import open_cache
from formats.store import OPTIONS_ENV
from formats.verify import verify_cache
from tests.formats.remote import s3_options

# The `ray` extra (`make install` installs it). Not imported here: Ray reads RAY_ENV when it is first imported.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the ray extra")

STDLIB = Path(os.__file__).parent
FILES = ("bisect.py", "colorsys.py", "heapq.py", "keyword.py", "textwrap.py", "fnmatch.py", "glob.py", "shlex.py")
# Ray binds loopback only: its address resolution otherwise swaps 127.0.0.1 for the machine's network address.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node and a second node on 127.0.0.1, 2 CPUs each; yields its address."""
    temp = tmp_path_factory.mktemp("ray")
    # The nodes start without this process's storage settings, as a remote cluster's do: a replica has only what
    # the build hands it.
    storage = [k for k in os.environ if k == OPTIONS_ENV or k.startswith("FSSPEC_")]
    saved = {k: os.environ.get(k) for k in (*RAY_ENV, "RAY_TMPDIR", *storage)}
    for k in storage:
        del os.environ[k]
    os.environ.update(RAY_ENV, RAY_TMPDIR=str(temp))
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    assert not ray_constants.ENABLE_RAY_CLUSTER, "ray was imported before RAY_ENV was set: it would leave loopback"
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False,
                                                      "node_ip_address": "127.0.0.1"})
    try:
        c.add_node(num_cpus=2, node_ip_address="127.0.0.1")
        for k in storage:
            os.environ[k] = saved[k]
        yield c.address
    finally:
        c.shutdown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    assert _processes(str(temp), wait=30) == [], "Ray processes outlived the cluster"


def _processes(needle: str, wait: float = 0.0) -> list[str]:
    """Command lines of live processes that mention `needle`, after waiting up to `wait` s for them to end."""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if needle in cmd:
                found.append(f"{pid} {cmd[:200]}")
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.5)


def replica_pids(mid_shard: bool = False) -> list[int]:
    """Processes of this machine's teacher replicas (Ray names a worker after the actor and the call it runs)."""
    title = "ray::TeacherReplica.run" if mid_shard else "ray::TeacherReplica"
    return [int(line.split()[0]) for line in _processes(title) if line.split()[1].startswith(title)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for name in FILES:
        (folder / f"{name}.txt").write_text((STDLIB / name).read_text(encoding="utf-8")[:1600], encoding="utf-8")
    return folder


def settings(teacher: Path, corpus: Path, out: Path, **kw) -> BuildSettings:
    base = dict(teacher=str(teacher), corpus=[str(corpus)], out=str(out), top_k=4, seq_len=64, shard_tokens=150,
                max_batch_tokens=256, sample_draws=8, heldout_fraction=0.25, packing=True, txt_split="lines",
                hidden_layers=[-1], progress=False)
    base.update(kw)
    return BuildSettings(**base)


def shards(out: Path) -> list[tuple]:
    """What must agree between builds: each shard's split, counts, file and content checksums, in manifest order."""
    return [(s.split, s.sequences, s.tokens, s.sha256, s.content_sha256) for s in open_cache(out).manifest.shards]


@pytest.fixture(scope="module")
def local(tiny_teacher, corpus, tmp_path_factory) -> list[tuple]:
    out = tmp_path_factory.mktemp("local") / "c"
    run_build(settings(tiny_teacher, corpus, out))
    assert verify_cache(str(out)) == []
    return shards(out)


def test_ray_builds_with_two_and_three_replicas_equal_a_local_and_a_merged_parts_build(
        cluster, tiny_teacher, corpus, local, tmp_path):
    assert len(local) >= 12 and {s[0] for s in local} == {"train", "heldout"}
    parts = [tmp_path / "parts" / f"part-{p}" for p in range(3)]
    for p, out in enumerate(parts):
        run_build(settings(tiny_teacher, corpus, out, num_parts=3, part=p))
    merge_parts(tmp_path / "parts", [str(p) for p in parts])
    assert verify_cache(str(tmp_path / "parts")) == []
    assert shards(tmp_path / "parts") == local
    for n in (2, 3):  # one replica: the replica-kill test below, which ends with these same shards
        out = tmp_path / f"ray-{n}"
        man = run_build(settings(tiny_teacher, corpus, out, ray=cluster, ray_replicas=n))
        assert shards(out) == local, f"{n} replicas"
        assert man.complete and verify_cache(str(out)) == []
    assert _wait_for(lambda: replica_pids() == [], 30), "replicas outlived their build"


def test_a_replica_killed_in_the_middle_of_a_shard_is_restarted_and_the_cache_is_unchanged(
        cluster, tiny_teacher, corpus, local, tmp_path):
    out = tmp_path / "c"
    result: dict = {}
    build = threading.Thread(target=lambda: result.update(
        manifest=run_build(settings(tiny_teacher, corpus, out, ray=cluster, ray_replicas=1))))
    build.start()
    killed = None
    deadline = time.monotonic() + 120
    while build.is_alive() and killed is None and time.monotonic() < deadline:
        published = json.loads((out / MANIFEST_NAME).read_text())["shards"] if (out / MANIFEST_NAME).exists() else []
        running = replica_pids(mid_shard=True)
        if len(published) >= 3 and running:  # a few shards in, so the restart has to resume mid-build
            killed = running[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.002)
    build.join(timeout=300)
    assert killed is not None, "the build ended before a replica could be caught mid-shard"
    # One replica: the build could only finish because Ray restarted it and ran the shard again.
    assert "manifest" in result, "the build failed after the replica was killed"
    assert shards(out) == local
    assert not [n for n in os.listdir(out / "shards") if ".tmp-" in n], "a temporary file was left"
    assert verify_cache(str(out)) == []


def build_cmd(teacher: Path, corpus: Path, out: Path, address: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kdcache.cli", "build", "--teacher", str(teacher), "--corpus", str(corpus),
            "--out", str(out), "--top-k", "4", "--seq-len", "64", "--shard-tokens", "150", "--max-batch-tokens", "256",
            "--sample-draws", "8", "--heldout-fraction", "0.25", "--packing", "--txt-split", "lines", "--hidden-layers=-1",
            "--no-progress",
            "--ray", address, "--ray-replicas", "2", *extra]


def test_replicas_writing_to_s3_get_the_storage_options_of_the_build_not_of_the_cluster(
        cluster, tiny_teacher, corpus, local, moto_endpoint, monkeypatch):
    import s3fs

    options = s3_options(moto_endpoint)
    bucket = f"kdcache-ray-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**options).mkdir(bucket)
    # Given to the driver only, as `--storage-option` does: the cluster's nodes started without it.
    monkeypatch.setenv(OPTIONS_ENV, json.dumps(options))
    url = f"s3://{bucket}/c"
    man = run_build(settings(tiny_teacher, corpus, url, ray=cluster, ray_replicas=2))
    assert man.complete and shards(url) == local
    assert verify_cache(url) == []


def test_a_killed_driver_is_resumed_by_the_same_command(cluster, tiny_teacher, corpus, local, tmp_path):
    out = tmp_path / "c"
    cmd = build_cmd(tiny_teacher, corpus, out, cluster)
    env = {**os.environ, **RAY_ENV}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 180
    published = 0
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / MANIFEST_NAME).exists():
            published = len(json.loads((out / MANIFEST_NAME).read_text())["shards"])
            if published >= 3:
                break
        time.sleep(0.01)
    assert proc.poll() is None, f"the build ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _wait_for(lambda: replica_pids() == [], 60), "the killed driver's replicas were not stopped"
    assert shards(out)[:published] == local[:published]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert shards(out) == local and verify_cache(str(out)) == []


def test_a_bad_record_stops_a_ray_build_with_one_line_and_nothing_half_written(cluster, tiny_teacher, corpus,
                                                                              tmp_path):
    bad, good = tmp_path / "bad", tmp_path / "good"
    good_lines = "".join(json.dumps({"text": f"record {i} of the last file"}) + "\n" for i in range(400))
    for folder, last in ((bad, good_lines + '{"text": "cut short\n'), (good, good_lines)):
        folder.mkdir()
        for f in corpus.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        (folder / "zz-last.jsonl").write_text(last)  # read last, after more than one tokenizer batch
    out = tmp_path / "c"
    proc = subprocess.run(build_cmd(tiny_teacher, bad, out, cluster), capture_output=True, text=True,
                          env={**os.environ, **RAY_ENV})
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("kdcache build:")]
    assert len(lines) == 1 and "zz-last.jsonl:401: malformed JSON" in lines[0], proc.stderr[-2000:]
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert len(manifest["shards"]) > 0 and not manifest["complete"]
    # Only whole shards are published, nothing else is left in the shard folder, and what is published is the
    # start of the build without the bad record.
    assert sorted(os.listdir(out / "shards")) == sorted(Path(s["path"]).name for s in manifest["shards"])
    run_build(settings(tiny_teacher, good, tmp_path / "good-cache"))
    want = shards(tmp_path / "good-cache")
    assert [(s["split"], s["content_sha256"]) for s in manifest["shards"]] == [
        (w[0], w[4]) for w in want][:len(manifest["shards"])]


def test_a_shard_that_fails_in_its_replica_stops_the_build_naming_the_error(cluster, tiny_teacher, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "ids.jsonl").write_text(json.dumps({"input_ids": [1, 2, 3, 4, 5, 6]}) + "\n")
    with pytest.raises(BuildError, match=r"--byte-offsets needs text documents"):
        run_build(settings(tiny_teacher, corpus, tmp_path / "c", byte_offsets=True, packing=False, ray=cluster))
    assert not (tmp_path / "c" / "shards").exists() or os.listdir(tmp_path / "c" / "shards") == []


@pytest.mark.integration
def test_a_ray_build_of_the_default_teacher_equals_a_local_one(cluster, teacher_dir, corpus, tmp_path):
    kw = dict(top_k=16, seq_len=128, shard_tokens=600, max_batch_tokens=512, sample_draws=0, hidden_layers=[])
    # A CPU matmul's sums depend on its thread count (bf16 logits differ by up to ~1 between 1 and 2 threads on
    # SmolLM2), so the local build runs with the replicas' one thread (--ray-cpus 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_build(settings("default", corpus, tmp_path / "local", **kw))
    finally:
        torch.set_num_threads(threads)
    run_build(settings("default", corpus, tmp_path / "ray", ray=cluster, ray_replicas=2, **kw))
    assert shards(tmp_path / "ray") == shards(tmp_path / "local")
    assert open_cache(tmp_path / "ray").manifest.teacher == open_cache(tmp_path / "local").manifest.teacher


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True
