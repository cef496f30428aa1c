"""A training run's output folder (`--out`): recognisable, held by one run at a time, never someone else's folder.

    OUT/kdcache_run.json   marker: written when a run first claims the folder; kdcache writes only into folders
                           that hold it (or that are empty or new)
    OUT/.lock              `flock`ed by the run writing here; the OS drops it when that process dies
    OUT/settings.json, metrics.jsonl, checkpoints/, final/, tensorboard/, wandb_run_id   the run's own files

The rules (issue #19): a non-empty folder without the marker is refused, so a user's files (their own
metrics.jsonl, a cache, a corpus) are never overwritten; a folder another run holds is refused; `--resume` needs a
checkpoint; a fresh run into a run folder with checkpoints is refused (its checkpoints and metrics would mix with
the new run's). kdcache deletes nothing here but files of its own runs (a checkpoint it rewrites, metrics lines a
resumed run redoes).
"""

from __future__ import annotations

import fcntl
import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from formats.manifest import atomic_write_bytes
from student_trainer.checkpoint import latest_checkpoint
from student_trainer.errors import TrainError

RUN_MARKER = "kdcache_run.json"
LOCK_NAME = ".lock"


@dataclass
class RunFolder:
    """A run folder this process holds (its lock is taken); `release()` lets another run in."""

    path: Path
    lock_file: IO

    def release(self) -> None:
        if not self.lock_file.closed:
            fcntl.flock(self.lock_file, fcntl.LOCK_UN)
            self.lock_file.close()


def check_run_folder(out: Path, resume: bool, *, probe_lock: bool = True) -> None:
    """The checks of `claim_run_folder`, made read-only before any heavy work, so a wrong --out or --resume is refused
    in a second rather than after the student is loaded: nothing is created. `probe_lock`: also refuse a folder
    another run holds (tries the lock and lets go)."""
    _check_foreign(out)
    if probe_lock and (out / LOCK_NAME).is_file():
        with open(out / LOCK_NAME, "rb") as f:
            _lock(f, out)  # closing the file lets go of it
    _check_checkpoints(out, resume)


def claim_run_folder(out: Path, resume: bool) -> RunFolder:
    """Make `out` this run's folder: created if missing, locked, checked again under the lock, marked."""
    _check_foreign(out)  # before anything, the lock file included, is created in it
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock_file = open(out / LOCK_NAME, "a+")
    except OSError as e:
        raise TrainError(f"{out}: cannot write a training run here ({e.strerror or e})") from None
    try:
        _lock(lock_file, out)
        _check_checkpoints(out, resume)
        if not (out / RUN_MARKER).exists():
            atomic_write_bytes(out / RUN_MARKER, json.dumps({"kdcache": "training run", "version": 1}).encode())
    except BaseException:
        lock_file.close()  # closing drops the lock
        raise
    return RunFolder(out, lock_file)


def _check_foreign(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a folder")
    if out.is_dir() and not (out / RUN_MARKER).exists():
        others = sorted(c.name for c in out.iterdir() if c.name != LOCK_NAME)
        if others:
            raise TrainError(f"--out {out} is not empty ({others[0]}{' ...' if len(others) > 1 else ''}) and is not "
                             f"a kdcache training run (no {RUN_MARKER}); give a new or empty folder")


def _lock(f: IO, out: Path) -> None:
    """Take the run's lock on `f` (an open `out/.lock`), or refuse: another run holds it."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise TrainError(f"{out}: another kdcache train is writing this run (it holds {LOCK_NAME})") from None
    except OSError:  # a filesystem without flock (some network mounts): the run goes on without the lock
        pass


def _check_checkpoints(out: Path, resume: bool) -> None:
    ckpt = latest_checkpoint(out) if out.is_dir() else None
    if resume and ckpt is None:
        raise TrainError(f"no checkpoint in {out}; drop --resume to start")
    if not resume and ckpt is not None:
        raise TrainError(f"{out} holds a run with checkpoints (latest {ckpt.name}); add --resume to continue it, or "
                         "give another --out")
