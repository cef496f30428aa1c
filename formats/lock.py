"""One writer per cache (SPEC.md, "Writing"): a local cache is locked with flock on `.lock`; a cache in an object
store, which has no locks, with a lock object `.lock` naming its owner and refreshed by a heartbeat.

Rule for a lock object: it is live while its heartbeat is younger than STALE_S, unless it names this host and a
process that no longer runs (a writer killed on this machine); a live lock refuses every other writer, `--overwrite`
included. A stale one is taken over. Two writers that start within the same instant could both see no lock: each
writes its own and reads it back, and the one whose token is not there gives up.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import socket
import threading
import time
import uuid

from formats.errors import CacheError
from formats.store import Store, describe_error

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def lock_is_live(info: dict, now: float | None = None) -> bool:
    """The stale-lock rule above, for a lock object's parsed contents."""
    now = time.time() if now is None else now
    beat = info.get("heartbeat")
    if not isinstance(beat, (int, float)) or now - beat >= STALE_S:
        return False
    pid = info.get("pid")
    if info.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_running(pid):
        return False
    return True


class LocalLock:
    """flock on `<root>/.lock`: released by the kernel when the process dies, so never stale."""

    def __init__(self, store: Store):
        path = store.path(LOCK_NAME)
        try:
            self.file = open(path, "a+")
        except OSError as e:
            raise CacheError(f"{store.root}: cannot write a cache here ({e.strerror or e})") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise CacheError(f"{store.root}: another process is writing this cache (it holds {LOCK_NAME})") from None

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


class ObjectLock:
    """The lock object of a cache in an object store, with a heartbeat thread while it is held."""

    def __init__(self, store: Store):
        self.store = store
        self.info = {"owner": _user(), "host": socket.gethostname(), "pid": os.getpid(),
                     "token": uuid.uuid4().hex, "started": time.time(), "heartbeat": time.time()}
        held = self._read()
        if held is not None and lock_is_live(held):
            age = time.time() - held["heartbeat"]
            raise CacheError(
                f"{store.name(LOCK_NAME)}: another writer holds this cache ({held.get('owner')} on {held.get('host')}, "
                f"pid {held.get('pid')}, heartbeat {age:.0f} s ago); a lock counts as stale after {STALE_S:.0f} s "
                "without a heartbeat, or at once when its process is gone from this host")
        self._write()
        time.sleep(0.05)  # a writer that raced us has written by now: the object holds one token
        if (self._read() or {}).get("token") != self.info["token"]:
            raise CacheError(f"{store.name(LOCK_NAME)}: another writer took this cache at the same moment")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="kdcache-lock-heartbeat", daemon=True)
        self._thread.start()

    def _read(self) -> dict | None:
        try:
            data = self.store.read_bytes(LOCK_NAME)
        except FileNotFoundError:
            return None
        except Exception as e:
            raise CacheError(f"{self.store.name(LOCK_NAME)}: cannot read the lock object ({describe_error(e)})") from None
        try:
            info = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {}  # unreadable: no heartbeat, so stale
        return info if isinstance(info, dict) else {}

    def _write(self) -> None:
        try:
            self.store.write_bytes(LOCK_NAME, json.dumps(self.info).encode())
        except Exception as e:
            raise CacheError(f"{self.store.name()}: cannot write a cache here ({describe_error(e)})") from None

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.refresh()

    def refresh(self) -> None:
        """Renew the heartbeat, unless someone took the lock over (then leave theirs alone)."""
        with contextlib.suppress(Exception):
            if (self._read() or {}).get("token") == self.info["token"]:
                self.info["heartbeat"] = time.time()
                self._write()

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        with contextlib.suppress(Exception):
            if (self._read() or {}).get("token") == self.info["token"]:
                self.store.fs.rm_file(self.store.path(LOCK_NAME))


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def acquire(store: Store) -> LocalLock | ObjectLock:
    return LocalLock(store) if store.local else ObjectLock(store)
