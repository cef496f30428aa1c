"""A real `kdcache train` process meeting the faults of issue #19: killed with SIGKILL (its loader workers must not
outlive it), interrupted with Ctrl-C (one line, exit 130, no traceback from a worker), a second run on the same
folder (refused by the run's lock), a full disk while a checkpoint is written (one line, no temporary folder), and
run folders it must not write into."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from student_trainer.run_folder import RUN_MARKER

pytestmark = pytest.mark.integration


def train_cmd(cache: str, student: Path, out: Path, *extra: str) -> list[str]:
    """A run long enough to be caught mid-way (the tests stop it): the tiny teacher as the student, one worker."""
    return [sys.executable, "-m", "kdcache.cli", "train", "--cache", cache, "--out", str(out), "--student", str(student),
            "--steps", "100000", "--batch-size", "2", "--num-workers", "1", "--no-progress", *extra]


def start(cmd: list[str]) -> subprocess.Popen:
    # Its own session, so a Ctrl-C can go to its whole process group (trainer and workers), as a terminal sends it.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


def wait_for_steps(proc: subprocess.Popen, out: Path, steps: int, timeout: float = 300) -> None:
    """Until metrics.jsonl has `steps` lines (so the loader worker is up and serving)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = out / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= steps:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the trainer exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no {steps} steps within {timeout} s")


def alive(pids: list[int]) -> list[int]:
    """The pids still running (a zombie, waiting for a parent to reap it, is not running)."""
    running = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
        except psutil.NoSuchProcess:
            pass
    return running


def wait_gone(pids: list[int], timeout: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(pids)


def sigint_blocked(pid: int) -> bool:
    """Whether process `pid` blocks SIGINT (the SigBlk mask in /proc/PID/status, bit SIGINT - 1)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:  # it ended (its epoch did) between the listing and now
        return True
    for line in status.splitlines():
        if line.startswith("SigBlk:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGINT - 1) & 1)
    return False


def loader_workers(pid: int) -> list[int]:
    children = psutil.Process(pid).children(recursive=True)
    return [c.pid for c in children if "spawn_main" in " ".join(c.cmdline())]


def test_loader_workers_die_with_a_trainer_killed_by_sigkill(tiny_cache, tiny_teacher, tmp_path):
    out = tmp_path / "run"
    proc = start(train_cmd(tiny_cache, tiny_teacher, out))
    try:
        wait_for_steps(proc, out, 2)
        workers = loader_workers(proc.pid)
        assert workers, "no loader worker process found"
        proc.kill()  # SIGKILL: the trainer cannot stop anything
        proc.wait(timeout=30)
        assert wait_gone(workers) == [], "a loader worker outlived its trainer"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_ctrl_c_stops_training_with_one_line_exit_130_and_no_worker_left(tiny_cache, tiny_teacher, tmp_path):
    out = tmp_path / "run"
    proc = start(train_cmd(tiny_cache, tiny_teacher, out, "--checkpoint-every", "2"))
    try:
        wait_for_steps(proc, out, 3)
        workers = loader_workers(proc.pid)
        assert workers, "no loader worker process found"
        # A worker alone first: it leaves Ctrl-C to its trainer (before, it died with a traceback, and the
        # trainer with "loader worker died").
        # The tiny cache's epochs last about a second and each epoch has workers of its own, so whether this one is
        # still alive two seconds later says nothing; its signal mask says whether SIGINT can reach it.
        assert all(sigint_blocked(w) for w in alive(workers)), "a loader worker does not block SIGINT"
        os.kill(workers[0], signal.SIGINT)
        time.sleep(2)
        assert proc.poll() is None, "the trainer stopped when only its worker got SIGINT"
        wait_for_steps(proc, out, len((out / "metrics.jsonl").read_text().splitlines()) + 2)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the whole foreground group, workers included
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert lines[0].startswith("kdcache train: interrupted at step "), lines[0]
    last = (out / "checkpoints" / "latest").read_text().strip()
    assert f"the last checkpoint is step {int(last.split('-')[1])}: --resume continues from it" in lines[0]
    assert wait_gone(workers) == []


def test_a_second_train_on_a_run_folder_in_use_is_refused_and_the_first_goes_on(tiny_cache, tiny_teacher, tmp_path):
    out = tmp_path / "run"
    first = start(train_cmd(tiny_cache, tiny_teacher, out, "--num-workers", "0"))
    try:
        wait_for_steps(first, out, 1)
        second = subprocess.run(train_cmd(tiny_cache, tiny_teacher, out, "--num-workers", "0", "--steps", "3"),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert second.stderr.strip() == f"kdcache train: error: {out}: another kdcache train is writing this run " \
                                        "(it holds .lock)"
        before = len((out / "metrics.jsonl").read_text().splitlines())
        wait_for_steps(first, out, before + 2)  # the first run was not disturbed
    finally:
        first.kill()
        first.communicate()
    assert (out / RUN_MARKER).exists()


def test_a_fresh_run_into_a_run_folder_with_checkpoints_is_refused_and_resume_continues(tiny_cache, tiny_teacher,
                                                                                       tmp_path):
    out = tmp_path / "run"
    base = train_cmd(tiny_cache, tiny_teacher, out, "--num-workers", "0", "--checkpoint-every", "1")
    done = subprocess.run([*base, "--steps", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    again = subprocess.run([*base, "--steps", "3"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.strip().endswith(
        "holds a run with checkpoints (latest step-0000002); add --resume to continue it, or give another --out")
    resumed = subprocess.run([*base, "--steps", "3", "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.fixture
def small_disk(tmp_path):
    """A real 12 MiB filesystem (tmpfs): the run's small files fit, the tiny student's 25 MB checkpoint does not.
    Needs root and a kernel that lets it mount; tests/bad_input_cases.py covers the same case with a file-size
    limit on any machine."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_temporary_folder(tiny_cache, tiny_teacher,
                                                                                   small_disk):
    out = small_disk / "run"
    proc = subprocess.run(train_cmd(tiny_cache, tiny_teacher, out, "--num-workers", "0", "--steps", "2"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0] == (f"kdcache train: error: {out}/checkpoints/step-0000002: could not write the checkpoint (No space "
                        "left on device); no temporary files are left and the latest checkpoint is unchanged")
    left = sorted(p.name for p in out.rglob("*"))
    assert [n for n in left if ".tmp-" in n or n.startswith("step-") or n == "final"] == [], left
    assert (out / "metrics.jsonl").exists()  # the steps it did are logged
