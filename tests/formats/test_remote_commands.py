"""The commands on remote caches, end to end with the tiny teacher: `build` to S3 (and killed with SIGKILL mid-way,
then resumed), and `verify`, `inspect`, `train`, `eval` from S3 (storage options given as flags) and from HTTP
servers with and without Range support, Parquet and Zarr."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cache_builder.build import run_build
from cache_builder.settings import BuildSettings
from formats.convert import convert_cache
from formats.reader import open_cache
from formats.store import OPTIONS_ENV

STDLIB = Path(os.__file__).parent
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("remote-corpus")
    for name in ("colorsys.py", "textwrap.py", "bisect.py", "heapq.py"):
        (folder / f"{name}.txt").write_text((STDLIB / name).read_text(encoding="utf-8")[:3000], encoding="utf-8")
    return folder


def _settings(teacher: Path, corpus: Path, out: str, **kw) -> BuildSettings:
    base = dict(teacher=str(teacher), corpus=[str(corpus)], out=out, top_k=8, seq_len=128, shard_tokens=300,
                max_batch_tokens=512, progress=False, heldout_fraction=0.25)
    base.update(kw)
    return BuildSettings(**base)


def _cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in (env or os.environ).items() if k != OPTIONS_ENV}  # the flags carry the options
    return subprocess.run([sys.executable, "-m", "kdcache.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**env, "HF_HUB_OFFLINE": "1"})


def _flags(s3) -> list[str]:
    return [f for k, v in s3.options.items() for f in ("--storage-option", f"{k}={v}")]


def _checksums(url: str) -> list[tuple[str, str, str]]:
    return [(s.path, s.sha256, s.content_sha256) for s in open_cache(url).manifest.shards]


def test_a_build_to_s3_equals_the_local_build_and_trains_evaluates_verifies_from_there(s3, tiny_teacher, corpus,
                                                                                      tmp_path):
    local = str(tmp_path / "local")
    run_build(_settings(tiny_teacher, corpus, local))
    url = f"{s3.url}/cache"
    run_build(_settings(tiny_teacher, corpus, url))
    assert _checksums(url) == _checksums(local)
    flags = [*_flags(s3), "--shard-cache", str(tmp_path / "shards")]
    assert _cli("verify", url, *flags).returncode == 0
    proc = _cli("inspect", url, "--json", *flags)
    assert proc.returncode == 0 and json.loads(proc.stdout)["totals"]["shards"] == len(_checksums(local))
    proc = _cli("verify", url)  # without the options: one line, no traceback
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    out = tmp_path / "run"
    proc = _cli("train", "--cache", url, "--out", str(out), "--student-layers", "1", "--init-from-teacher",
                str(tiny_teacher), "--steps", "3", "--batch-size", "2", "--num-workers", "1", "--no-progress", *flags)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _cli("eval", "--student", str(out / "final"), "--cache", url, "--json", *flags)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["kl_to_teacher"] > 0


def test_a_build_to_s3_killed_mid_way_resumes_to_the_uninterrupted_checksums(s3, tiny_teacher, corpus, tmp_path):
    local = str(tmp_path / "local")
    run_build(_settings(tiny_teacher, corpus, local, shard_tokens=128))
    url = f"{s3.url}/cache"
    cmd = ["build", "--teacher", str(tiny_teacher), "--corpus", str(corpus), "--out", url, "--top-k", "8",
           "--seq-len", "128", "--shard-tokens", "128", "--max-batch-tokens", "512", "--heldout-fraction", "0.25",
           "--no-progress", *_flags(s3)]
    env = {k: v for k, v in os.environ.items() if k != OPTIONS_ENV}
    proc = subprocess.Popen([sys.executable, "-m", "kdcache.cli", *cmd], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    manifest = f"{url[5:]}/manifest.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        s3.fs.invalidate_cache()
        if s3.fs.exists(manifest) and len(json.loads(s3.fs.cat_file(manifest))["shards"]) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be killed; make the corpus larger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    published = json.loads(s3.fs.cat_file(manifest))
    assert not published["complete"] and 2 <= len(published["shards"]) < len(_checksums(local))
    again = _cli(*cmd)  # the dead writer's lock object names a process gone from this host: taken over
    assert again.returncode == 0, again.stderr[-2000:]
    assert _checksums(url) == _checksums(local)


@pytest.mark.parametrize("ranges", [False, True], ids=["http.server", "range-server"])
def test_verify_inspect_train_eval_read_parquet_and_zarr_caches_over_http(http_server, tiny_teacher, corpus, tmp_path,
                                                                         ranges):
    site = tmp_path / "site"
    run_build(_settings(tiny_teacher, corpus, str(site / "parquet")))
    convert_cache(site / "parquet", "zarr", site / "zarr")
    base = http_server(site, ranges)
    flags = ["--shard-cache", str(tmp_path / "shards")]
    for backend in ("parquet", "zarr"):
        url = f"{base}/{backend}"
        assert _cli("verify", url, *flags).returncode == 0
        assert _cli("inspect", url, *flags).returncode == 0
        out = tmp_path / f"run-{backend}"
        proc = _cli("train", "--cache", url, "--out", str(out), "--student-layers", "1", "--init-from-teacher",
                    str(tiny_teacher), "--steps", "2", "--batch-size", "2", "--num-workers", "1", "--no-progress",
                    *flags)
        assert proc.returncode == 0, proc.stderr[-2000:]
        proc = _cli("eval", "--student", str(out / "final"), "--cache", url, "--json", *flags)
        assert proc.returncode == 0, proc.stderr[-2000:]
