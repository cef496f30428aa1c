"""Streaming training batches out of a cache: one rank's batches of an epoch, read by worker processes, exactly
resumable. The order comes from student_trainer/order.py, collation from collate.py.

The pipeline is torchdata.nodes: window tasks -> ParallelMapper (worker processes read and collate one
window each, in order, into one shared-memory buffer, reused once the trainer has let go of the window it
held: `PackedBatches`) -> Unbatcher -> PinMemory -> Prefetcher. Workers open the cache themselves (spawned,
never forked: zarr's event loop thread does not survive a fork). A worker that dies (SIGKILL, OOM) fails the
epoch with a LoaderError (`WatchedMapper`); workers ignore Ctrl-C, end with the trainer (student_trainer/workers.py),
and are stopped when the batches are closed or dropped.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import torch
from torchdata.nodes import (  # light once torch is loaded (~25 ms)
    BaseNode,
    IterableWrapper,
    Loader,
    ParallelMapper,
    PinMemory,
    Prefetcher,
    Unbatcher,
)

from formats.reader import Cache, open_cache
from formats.schema import SeqBlock
from student_trainer.batch import Batch
from student_trainer.collate import PackedBatches
from student_trainer.errors import LoaderError
from student_trainer.memory import keep_freed_memory
from student_trainer.order import Block, ResumeState, cache_id, check_resume, epoch_windows, list_blocks, rank_slice
from student_trainer.workers import WorkerFn, sigint_blocked


@dataclass(frozen=True)
class LoaderSettings:
    batch_size: int = 8  # sequences per rank per step
    shuffle_blocks: int = 8  # read blocks per shuffle window (more: better mixing, more worker memory)
    seed: int = 0  # order of every epoch follows from it
    num_workers: int = 1  # reader processes per rank (0: read in the training process)
    prefetch: int = 4  # batches read ahead
    pin_memory: bool = False  # page-locked batches for faster host-to-GPU copies
    pad_to: int = 0  # pad every batch to this length (0: longest sequence of the batch)


@dataclass(frozen=True)
class WindowTask:
    """Everything a worker needs to read and collate one window (plain data: it is pickled to workers)."""

    url: str
    split: str
    blocks: tuple[Block, ...]  # the window's blocks, by block number
    block_numbers: tuple[int, ...]
    batches: tuple[tuple[tuple[int, int], ...], ...]  # this rank's batches: (block number, sequence in block)
    hidden_layers: tuple[int, ...]
    pad_to: int


_OPEN: dict[str, Cache] = {}
# Shard readers kept across windows (per process): opening one parses a Parquet footer or a Zarr group's
# metadata and index, ~10-20 ms, which per 16k-token window is a fair part of the read. Bounded, oldest out.
_READERS: dict[tuple[str, str, int], object] = {}
_MAX_READERS = 64


def _reader(cache: Cache, url: str, split: str, shard: int):
    key = (url, split, shard)
    reader = _READERS.get(key)
    if reader is None:
        if len(_READERS) >= _MAX_READERS:
            del _READERS[next(iter(_READERS))]
        reader = _READERS[key] = cache.open_shard(cache.shards(split)[shard])
    return reader


def read_window(task: WindowTask, in_worker: bool = False) -> PackedBatches:
    """Worker side: read the window's blocks once, then collate this rank's batches from them (into shared
    memory when `in_worker`: the batches then cross to the trainer process without another copy)."""
    cache = _OPEN.get(task.url)
    if cache is None:
        cache = _OPEN[task.url] = open_cache(task.url, require_complete=True)
    needed = {b for batch in task.batches for b, _ in batch}
    data: dict[int, SeqBlock] = {}
    for number, block in zip(task.block_numbers, task.blocks):
        if number in needed:
            data[number] = _reader(cache, task.url, task.split, block.shard).read_range(block.start, block.stop)
    seqs = [[data[b].get(j) for b, j in batch] for batch in task.batches]
    return PackedBatches(seqs, list(task.hidden_layers), task.pad_to, cache.manifest.fields, shared=in_worker)


class EpochReader:
    """Batches of one rank for one epoch, from a given step (the trainer counts consumed steps)."""

    def __init__(self, url: str, split: str, settings: LoaderSettings, rank: int = 0, world: int = 1,
                 hidden_layers: list[int] | None = None):
        self.url, self.split, self.settings = url, split, settings
        self.rank, self.world = rank, world
        self.cache = open_cache(url, require_complete=True)
        if not self.cache.shards(split):
            raise LoaderError(f"{url}: split {split!r} has no shards")
        self.blocks = list_blocks(self.cache, split)
        self.hidden_layers = list(hidden_layers or [])
        self.cache_id = cache_id(self.cache, split)

    def state(self, epoch: int, step: int) -> ResumeState:
        s = self.settings
        return ResumeState(s.seed, epoch, step, s.batch_size, self.world, s.shuffle_blocks, self.cache_id)

    def check_resume(self, state: dict) -> ResumeState:
        """Refuse a resume state that does not fit these settings, naming the field and both values."""
        return check_resume(state, self.state(state.get("epoch", 0), state.get("step", 0)))

    def steps_per_epoch(self, epoch: int) -> int:
        """Batches per rank in `epoch`: windows group different blocks each epoch, so this varies a little."""
        gb = self.settings.batch_size * self.world
        return sum(len(w) for w in epoch_windows(self.blocks, self.settings.seed, epoch, self.settings.shuffle_blocks, gb))

    def tasks(self, epoch: int, start_step: int = 0) -> Iterator[tuple[WindowTask, int]]:
        """(task, batches of it to skip) for the windows that hold step `start_step` onwards."""
        s = self.settings
        step = 0
        for window in epoch_windows(self.blocks, s.seed, epoch, s.shuffle_blocks, s.batch_size * self.world):
            if step + len(window) <= start_step:
                step += len(window)
                continue
            numbers = tuple(sorted({b for gb in window for b, _ in gb}))
            mine = tuple(tuple(rank_slice(gb, self.rank, self.world)) for gb in window)
            yield (WindowTask(self.url, self.split, tuple(self.blocks[n] for n in numbers), numbers, mine,
                              tuple(self.hidden_layers), s.pad_to), max(0, start_step - step))
            step += len(window)

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """This rank's batches of `epoch` from `start_step`, through the torchdata pipeline."""
        s = self.settings
        node = IterableWrapper(self.tasks(epoch, start_step))
        watch = None
        if s.num_workers > 0:
            mapper = ParallelMapper(node, map_fn=WorkerFn(_read_and_skip), num_workers=s.num_workers, in_order=True,
                                    method="process", multiprocessing_context="spawn")
            node = watch = WatchedMapper(mapper, self.url)
        else:
            node = ParallelMapper(node, map_fn=_read_and_skip, num_workers=0, in_order=True)
        node = Unbatcher(node)
        if s.pin_memory and torch.cuda.is_available():
            node = PinMemory(node)
        node = Prefetcher(node, prefetch_factor=max(1, s.prefetch))
        return _plain_errors(iter(Loader(node, restart_on_stop_iteration=False)), watch)


def _plain_errors(batches: Iterator[Batch], watch: "WatchedMapper | None") -> Iterator[Batch]:
    """The batches, but a dead worker surfaces as the watch's one-line LoaderError: torchdata's prefetch
    thread re-raises it wrapped in a multi-line traceback text. Closed (or dropped) before the epoch's end, say
    by Ctrl-C in the trainer, it stops the workers at once."""
    try:
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except LoaderError:
                if watch is not None and watch.error:
                    raise LoaderError(watch.error) from None
                raise
            yield batch
    finally:
        if watch is not None:
            watch.stop()


def _read_and_skip(item: tuple[WindowTask, int]) -> PackedBatches:
    task, skip = item
    in_worker = multiprocessing.parent_process() is not None
    if in_worker:
        keep_freed_memory()
    return read_window(dataclasses.replace(task, batches=task.batches[skip:]), in_worker=in_worker)


class WatchedMapper(BaseNode):
    """A torchdata ParallelMapper (worker processes) that fails when a worker dies instead of waiting forever.

    torchdata 0.11's mapper waits on its result queue in a loop with no end: a worker killed by SIGKILL or
    the OOM killer never answers, and training hangs. Here the mapper's `next` runs on a helper thread while
    this node polls the workers' exit codes; a dead worker raises a one-line LoaderError within
    `poll_s` seconds and the remaining workers are stopped. Windows are large (tens of batches), so one
    thread hand-off per window costs nothing measurable.
    """

    def __init__(self, mapper: BaseNode, url: str, poll_s: float = 0.25):
        super().__init__()
        self.mapper, self.url, self.poll_s = mapper, url, poll_s
        self._workers: list = []
        self._pool = None
        self.error = ""  # the one-line message once a worker has died

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        # The mapper starts its worker processes inside reset: they are the children that appear during it.
        before = set(multiprocessing.active_children())
        with sigint_blocked():  # Ctrl-C is the trainer's: it stops the workers (student_trainer/workers.py)
            self.mapper.reset(initial_state)
        self._workers = [p for p in multiprocessing.active_children() if p not in before]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-loader-watch")

    def next(self):
        future = self._pool.submit(self.mapper.next)
        while True:
            try:
                return future.result(timeout=self.poll_s)
            except FutureTimeout:
                pass
            dead = [p for p in self._workers if p.exitcode not in (None, 0)]
            if dead:
                self.stop()
                p = dead[0]
                self.error = (f"{self.url}: loader worker process {p.pid} died with exit code {p.exitcode} "
                              f"({_exit_reason(p.exitcode)}); the windows it held are lost, so the epoch cannot go on")
                raise LoaderError(self.error)

    def get_state(self) -> dict:
        return self.mapper.state_dict()

    def stop(self) -> None:
        """Stop the workers and the mapper's threads (the helper thread's `next` then ends); again: nothing."""
        for p in self._workers:
            if p.exitcode is None:
                p.kill()
        _stop_mapper_threads(self.mapper)
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


def _stop_mapper_threads(mapper: ParallelMapper) -> None:
    """Set the stop events a ParallelMapper's threads and worker loops check, so that they end (a `next` waiting
    on the result queue then raises StopIteration).

    torchdata 0.11.0 (pinned in pyproject.toml, its latest release; checked against torchdata/nodes/map.py) has
    no public way to stop a mapper: ParallelMapper and BaseNode offer only reset/next/get_state, and reset starts
    new workers. Its per-epoch iterator (`_ParallelMapperIter`, held as `mapper._it._it`) stops in `_shutdown`,
    which it otherwise calls only from `__del__`. This is the one place kdcache reaches into torchdata's private
    attributes. Were they renamed, the watch's helper thread would wait forever and the process could not exit
    (concurrent.futures joins its threads at exit): tests/student_trainer/test_loader.py checks that a call
    here ends a waiting `next`.
    """
    it = getattr(getattr(mapper, "_it", None), "_it", None)
    if hasattr(it, "_shutdown"):
        it._shutdown()


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" + ("; out of memory?" if -code == signal.SIGKILL else "")
    return "exited"
