"""Where shard groups are computed: the `Replicas` interface the build hands its work to, and its in-process form.

A replica holds one teacher, computes a group's records (`records.group_block`) and writes the shard's files
(`formats.writer.write_shard`: temporary name, fsync, rename); the shard is part of the cache only once the
build's one `CacheWriter` publishes it. `LocalReplica` is the teacher in the build's own process;
`ray_build.RayReplicas` is N teachers on a Ray cluster. Both answer `submit` with the shards finished meanwhile,
in any order; the build publishes them in shard order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cache_builder.groups import ShardGroup
from cache_builder.records import RecordSpec, group_block
from cache_builder.teacher import Teacher
from formats.manifest import ShardEntry
from formats.writer import write_shard


@dataclass
class ShardWork:
    group: ShardGroup
    index: int  # the shard's index in its split, in this cache (a part's cache numbers its own shards)
    path: str  # where its files go, relative to the cache root (CacheWriter.shard_path)


Finished = tuple[ShardWork, ShardEntry]


class Replicas(Protocol):
    def submit(self, work: ShardWork) -> list[Finished]:
        """Hand `work` over (blocking while every replica is busy); returns the shards finished meanwhile."""

    def drain(self) -> list[Finished]:
        """Wait for all work handed over; returns the shards not returned yet."""

    def close(self) -> None:
        """Stop the replicas and release their teachers; safe after an error and more than once."""


class LocalReplica:
    """The teacher in this process. A background thread writes each shard while the teacher computes the next,
    so the teacher never waits for the disk."""

    def __init__(self, teacher: Teacher, spec: RecordSpec, root: str, backend: str,
                 progress: Callable[[int], None]):
        self.teacher, self.spec, self.root, self.backend, self.progress = teacher, spec, root, backend, progress
        teacher.start()
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.finished: list[Finished] = []
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._write, name="kdcache-shard-writer", daemon=True)
        self.thread.start()

    def submit(self, work: ShardWork) -> list[Finished]:
        self._raise()
        block = group_block(self.teacher, work.group, self.spec, on_batch=self.progress)
        self.queue.put((work, block))
        return self._take()

    def drain(self) -> list[Finished]:
        self._stop()
        self._raise()
        return self._take()

    def close(self) -> None:
        self._stop()
        self.teacher.close()

    def _write(self) -> None:
        while (item := self.queue.get()) is not None:
            work, block = item
            if self.error is None:
                try:
                    entry = write_shard(self.root, work.path, work.group.split, block, self.spec.fields, self.backend)
                except BaseException as e:  # re-raised in the builder's thread
                    self.error = e
                    continue
                with self.lock:
                    self.finished.append((work, entry))

    def _stop(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()

    def _take(self) -> list[Finished]:
        with self.lock:
            out, self.finished = self.finished, []
        return out

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error
