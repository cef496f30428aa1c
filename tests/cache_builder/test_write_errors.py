"""A real `kdcache build` that meets a write error (a file-size limit standing in for a full disk) stops with one
clear error, leaves no partly published shard, and the same command run again resumes after the shards already
published and finishes the cache (issue #7, Faults: write errors). The writer-level cases (read-only folders, a full
disk during a shard or the manifest) are in tests/formats/test_writer.py."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from formats.reader import open_cache
from formats.verify import verify_cache
from tests.cache_builder.tiny_teacher import make_tiny_teacher

pytestmark = pytest.mark.integration

STDLIB = Path(os.__file__).parent
FILE_LIMIT = 12 * 1024  # shards of 64 tokens fit under it; the manifest outgrows it after some shards


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, teacher_dir) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny") / "teacher", teacher_dir)


def limit_file_size() -> None:
    """In the child: any write past FILE_LIMIT bytes fails with EFBIG, as a full disk fails with ENOSPC."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead of failing the write
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_a_build_stopped_by_a_full_disk_publishes_no_partial_shard_and_the_next_run_resumes(teacher, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("textwrap.py", "heapq.py"):
        (corpus / f"{name}.txt").write_text((STDLIB / name).read_text(encoding="utf-8")[:3000], encoding="utf-8")
    args = ["--teacher", str(teacher), "--corpus", str(corpus), "--top-k", "4", "--seq-len", "64",
            "--shard-tokens", "64", "--max-batch-tokens", "128", "--no-progress"]
    out = tmp_path / "full"
    cmd = [sys.executable, "-m", "kdcache.cli", "build", *args, "--out", str(out)]
    failed = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit_file_size)
    assert failed.returncode == 2, failed.stderr[-2000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("kdcache build: error:") and "manifest.json: could not publish shard shards/" in last, last
    assert "File too large" in last
    m = json.loads((out / "manifest.json").read_text())
    published = [(s["path"], s["sha256"]) for s in m["shards"]]
    assert not m["complete"] and len(published) > 0
    on_disk = sorted(f"shards/{n}" for n in os.listdir(out / "shards"))
    assert on_disk == sorted(p for p, _ in published), "a shard the manifest does not name was left in the cache"
    assert [n for n in os.listdir(out) if ".tmp-" in n] == []

    resumed = subprocess.run(cmd, check=True, capture_output=True, text=True)  # the disk has room again
    # It went on after the shards already there (test_kill_resume.py proves such a resume equals an unbroken build).
    done = int(resumed.stdout.split("this run ")[1].split(" tokens")[0])
    final = open_cache(out).manifest
    assert final.complete and [(s.path, s.sha256) for s in final.shards][: len(published)] == published
    assert len(final.shards) > len(published) and 0 < done < final.totals()["tokens"]
    assert verify_cache(str(out)) == []
