"""A real `kdcache build` process SIGKILLed at many random points, resumed each time with the same command, ends
with the same shards as a build that never stopped (issue #7, Faults).

The kill points are drawn from a seeded generator and spread over the whole build: some at a random time after
the start (while Python imports, the corpus is tokenized or the teacher loads), most a random moment after the
n-th shard is published, for n spread over the build, and some as soon as a shard's temporary file appears (in
the middle of a shard write). After every kill, what the manifest on disk publishes must already be a prefix of
the uninterrupted build's shards.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from formats.reader import open_cache
from formats.verify import verify_cache
from tests.cache_builder.tiny_teacher import make_tiny_teacher

pytestmark = pytest.mark.integration

STDLIB = Path(os.__file__).parent
SEED = 20261123
# Small sequences and shards: ~40 shards from ~2600 tokens, so there are many places to die between them.
BUILD_ARGS = ["--top-k", "4", "--seq-len", "64", "--shard-tokens", "64", "--max-batch-tokens", "128",
              "--sample-draws", "8", "--heldout-fraction", "0.2", "--no-progress"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, teacher_dir) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny") / "teacher", teacher_dir)


def build_cmd(teacher: Path, corpus: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "kdcache.cli", "build", "--teacher", str(teacher), "--corpus", str(corpus),
            "--out", str(out), *BUILD_ARGS]


def published(out: Path) -> dict:
    """The manifest on disk (it is replaced atomically, so a read sees a whole one) or an empty one."""
    try:
        return json.loads((out / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"shards": [], "complete": False}


def temp_files(out: Path) -> list[str]:
    try:
        return [n for n in os.listdir(out / "shards") if ".tmp-" in n]
    except FileNotFoundError:
        return []


def kill_plan(rng: random.Random, n_shards: int) -> list[tuple[str, float]]:
    """12 kill points in build order: ('time', seconds after start), ('shards', n published + jitter), ('temp', 0)."""
    # Targets stay clear of the end: every kill lets a few more shards land (a resumed build passes its target while
    # the jitter runs, a 'temp' kill may wait for up to 4 shards), and all twelve must land before the build ends.
    targets = sorted(rng.sample(range(1, n_shards - 16), 8))
    plan = [("time", rng.uniform(0.3, 4.0))]
    plan += [("shards", t + rng.uniform(0.0, 0.99)) for t in targets[:4]]
    plan += [("temp", 0.0), ("time", rng.uniform(0.5, 6.0))]
    plan += [("shards", t + rng.uniform(0.0, 0.99)) for t in targets[4:]]
    plan += [("temp", 0.0)]
    return plan


def run_until_killed(cmd: list[str], out: Path, kind: str, value: float, rng: random.Random) -> dict | None:
    """Start the build, SIGKILL it at the planned point; returns what was on disk at the kill (None: it finished)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    start = time.monotonic()
    before = len(published(out)["shards"])
    # 'shards' kills: a whole number of shards past what is already there, then a fraction of a second more.
    target = max(int(value), before + 1)
    jitter = (value - int(value)) * 0.05  # a fraction of one shard's time on a fast machine
    hit_at = None
    while proc.poll() is None and time.monotonic() - start < 180:
        m = published(out)
        if kind == "time":
            # A fast machine publishes many shards in a few seconds; a cap keeps later kill points reachable.
            due = time.monotonic() - start >= value or len(m["shards"]) >= before + 2
        elif kind == "shards":
            if hit_at is None and len(m["shards"]) >= target:
                hit_at = time.monotonic()
            due = hit_at is not None and time.monotonic() - hit_at >= jitter
        else:  # mid-write, or give up waiting for a temp file after a few more shards
            due = bool(temp_files(out)) or len(m["shards"]) >= before + 4
        if due and not m["complete"]:
            state = {"shards": len(m["shards"]), "temp_files": temp_files(out)}
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return state
        time.sleep(rng.uniform(0.0005, 0.003))
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.wait()
    assert proc.returncode == 0, err[-2000:]
    return None


def test_a_build_killed_at_ten_random_points_and_resumed_each_time_equals_an_uninterrupted_build(teacher, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("textwrap.py", "heapq.py", "bisect.py", "fnmatch.py"):
        (corpus / f"{name}.txt").write_text((STDLIB / name).read_text(encoding="utf-8")[:2600], encoding="utf-8")
    whole = tmp_path / "whole"
    subprocess.run(build_cmd(teacher, corpus, whole), check=True, capture_output=True)
    want = [(s.path, s.sha256, s.content_sha256) for s in open_cache(whole).manifest.shards]
    assert len(want) >= 30, "too few shards to spread ten kills over; make the corpus larger"

    rng = random.Random(SEED)
    killed = tmp_path / "killed"
    cmd = build_cmd(teacher, corpus, killed)
    landed = []
    for kind, value in kill_plan(rng, len(want)):
        state = run_until_killed(cmd, killed, kind, value, rng)
        if state is None:
            break
        landed.append((kind, state))
        on_disk = [(s["path"], s["sha256"], s["content_sha256"]) for s in published(killed)["shards"]]
        assert on_disk == want[:len(on_disk)], f"after a kill ({kind}) the published shards are not a prefix of the whole build's"
    assert len(landed) >= 10, f"only {len(landed)} kills landed before the build finished: {landed}"
    assert any(state["shards"] > 0 for _, state in landed) and any(state["shards"] > len(want) // 2 for _, state in landed)

    subprocess.run(cmd, check=True, capture_output=True)  # the same command, once more, finishes the cache
    got = open_cache(killed).manifest
    assert got.complete
    assert [(s.path, s.sha256, s.content_sha256) for s in got.shards] == want
    assert verify_cache(str(killed)) == []
