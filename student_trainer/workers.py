"""How loader worker processes start and end: they leave Ctrl-C to the trainer, and they end when the trainer does.

Workers are spawned by torchdata's ParallelMapper, whose worker loop waits for tasks until the trainer sets a
stop event. It handles neither of these (issue #19):
- Ctrl-C in a terminal sends SIGINT to the whole foreground process group, workers included, and each worker
  printed a KeyboardInterrupt traceback. Workers are started with SIGINT blocked (`sigint_blocked` around their
  start: a thread's signal mask is inherited through fork and exec, and Python leaves a blocked signal alone),
  so only the trainer sees it, and the trainer stops them.
- A trainer killed by SIGKILL (or the OOM killer) never sets the stop event, and its workers waited for tasks
  forever, holding their memory. The function the workers run is wrapped in `WorkerFn`, which a spawned worker
  unpickles before anything else it does for kdcache; unpickling starts a thread there that ends the worker
  once the process that started it is gone (its parent pid changes). A poll, not PR_SET_PDEATHSIG: that signal
  follows the parent *thread* that forked the worker, and torchdata may start workers from a thread that ends.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing import resource_tracker
from typing import Any

PARENT_POLL_S = 0.5  # how soon a worker notices that its trainer is gone


@contextmanager
def sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread while the block runs: processes started here inherit the block for good. A
    Ctrl-C that arrives meanwhile is delivered to the trainer when the block ends.

    multiprocessing's resource tracker is started first: starting it (which the first spawned process does)
    blocks SIGINT and then *unblocks* it (resource_tracker.ensure_running), which would undo this block."""
    resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class WorkerFn:
    """`fn`, as sent to worker processes: unpickled in a process other than the one that made it, it starts the
    watch that ends that process once its maker is gone (`exit_with_parent`)."""

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn
        self.parent_pid = os.getpid()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if os.getpid() != self.parent_pid:  # a copy made in the trainer itself must not watch anything
            exit_with_parent(self.parent_pid)

    def __call__(self, item: Any) -> Any:
        return self.fn(item)


def exit_with_parent(parent_pid: int, poll_s: float = PARENT_POLL_S) -> None:
    """Start a daemon thread that ends this process (exit status 0: nobody is left to read it) once its parent is no
    longer `parent_pid`: an orphan is adopted by init or a subreaper, so getppid() changes."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="kdcache-exit-with-parent", daemon=True).start()
