"""A build whose output turns read-only half-way (a real read-only mount, which binds root too): the next run
fails with one clear line and publishes nothing; once the output is writable again the same command resumes
and finishes a cache equal to an uninterrupted build (issue #7, Faults: write errors)."""

from __future__ import annotations

import json
import os
import shutil
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
BUILD_ARGS = ["--top-k", "4", "--seq-len", "64", "--shard-tokens", "64", "--max-batch-tokens", "128", "--no-progress"]


def mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def read_only_view(tmp_path):
    """(real, view): `view` shows `real` through a bind mount that `make_read_only()` remounts read-only."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs mount and root (as root, directory permissions do not stop writes; a read-only mount does)")
    real, view = tmp_path / "real", tmp_path / "view"
    real.mkdir()
    view.mkdir()
    if not mount("--bind", str(real), str(view)):
        pytest.skip("bind mounts are not permitted here")
    try:
        yield real, view
    finally:
        subprocess.run(["umount", str(view)], capture_output=True)


def published(out: Path) -> dict:
    try:
        return json.loads((out / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"shards": [], "complete": False}


def test_a_build_on_output_turned_read_only_fails_clearly_and_the_next_run_resumes(read_only_view, teacher_dir, tmp_path):
    real, view = read_only_view
    teacher = make_tiny_teacher(tmp_path / "teacher", teacher_dir)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("textwrap.py", "heapq.py"):
        (corpus / f"{name}.txt").write_text((STDLIB / name).read_text(encoding="utf-8")[:2600], encoding="utf-8")

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "kdcache.cli", "build", "--teacher", str(teacher), "--corpus", str(corpus),
                "--out", str(out), *BUILD_ARGS]

    subprocess.run(cmd(tmp_path / "whole"), check=True, capture_output=True)
    want = [(s.path, s.sha256) for s in open_cache(tmp_path / "whole").manifest.shards]

    # Part of the build lands, then the process dies (a node lost mid-build).
    out = view / "cache"
    proc = subprocess.Popen(cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and len(published(out)["shards"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = published(out)
    assert before["shards"] and not before["complete"], "the build finished before it could be stopped"
    files_before = sorted(p.name for p in (real / "cache" / "shards").iterdir())

    assert mount("-o", "remount,bind,ro", str(view)), "could not remount read-only"
    failed = subprocess.run(cmd(out), capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cache" in lines[0] and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    assert published(out) == before, "the manifest changed on a read-only output"
    assert sorted(p.name for p in (real / "cache" / "shards").iterdir()) == files_before

    assert mount("-o", "remount,bind,rw", str(view)), "could not remount read-write"
    subprocess.run(cmd(out), check=True, capture_output=True)
    got = open_cache(out).manifest
    assert got.complete and [(s.path, s.sha256) for s in got.shards] == want
    assert verify_cache(str(out)) == []
