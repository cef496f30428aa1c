"""student_trainer.loader on real caches built by the tiny teacher: every sequence once per epoch across ranks and
workers, exact mid-epoch resume, per-epoch shuffles, resume-state checks, and worker failures. Collation:
test_collate.py; window buffers: test_memory.py; the order's pure functions: test_order.py."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter

import pytest
from torchdata.nodes import IterableWrapper, ParallelMapper

from student_trainer.errors import LoaderError
from student_trainer.loader import EpochReader, LoaderSettings, _stop_mapper_threads
from student_trainer.order import ResumeState
from tests.student_trainer.sequences import delivered, same_batch, stored_sequences

# Small batches and windows so that one epoch of the tiny cache has several windows and short last batches.
SMALL = LoaderSettings(batch_size=2, shuffle_blocks=2, num_workers=0)


# ------------------------------------------------------------------------------------------- coverage


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_sequence_is_delivered_exactly_once_per_epoch_across_ranks_and_workers(tiny_cache, world, num_workers):
    settings = dataclasses.replace(SMALL, num_workers=num_workers)
    expected = Counter(list(stored_sequences(tiny_cache, "train")))
    got: Counter = Counter()
    counts = []
    for rank in range(world):
        reader = EpochReader(tiny_cache, "train", settings, rank, world, hidden_layers=[1, 2])
        batches = list(reader.batches(epoch=1))
        counts.append(len(batches))
        assert len(batches) == reader.steps_per_epoch(1)
        assert all(len(b.doc_index) <= settings.batch_size for b in batches)
        got.update(delivered(batches))
    assert got == expected and max(got.values()) == 1
    assert len(set(counts)) == 1, f"ranks got different numbers of batches: {counts}; DDP would hang"


def test_the_packed_zarr_cache_is_covered_once_by_two_ranks(packed_cache):
    expected = Counter(list(stored_sequences(packed_cache, "train")))
    got = Counter()
    for rank in range(2):
        got.update(delivered(list(EpochReader(packed_cache, "train", SMALL, rank, 2).batches(epoch=0))))
    assert got == expected and max(got.values()) == 1


def test_steps_per_epoch_counts_the_batches_of_that_very_epoch(tiny_cache):
    reader = EpochReader(tiny_cache, "train", dataclasses.replace(SMALL, batch_size=3), 0, 1)
    counts = {e: len(list(reader.batches(e))) for e in range(6)}
    assert counts == {e: reader.steps_per_epoch(e) for e in range(6)}
    assert len(set(counts.values())) > 1, "every epoch had as many batches; the test cannot tell epochs apart"


# ------------------------------------------------------------------------------------------- order and resume


@pytest.mark.parametrize("rank, world", [(0, 1), (1, 2)])
def test_a_reader_started_at_step_n_delivers_the_tail_of_the_full_epoch(tiny_cache, rank, world):
    reader = EpochReader(tiny_cache, "train", SMALL, rank, world, hidden_layers=[2])
    full = list(reader.batches(epoch=2))
    assert len(full) > 4
    for n in range(len(full) + 1):  # every step: at window starts, inside windows, and past the end
        fresh = EpochReader(tiny_cache, "train", SMALL, rank, world, hidden_layers=[2])
        tail = list(fresh.batches(epoch=2, start_step=n))
        assert len(tail) == len(full) - n
        assert all(same_batch(a, b) for a, b in zip(tail, full[n:])), f"resuming at step {n} changed the batches"


def test_resuming_with_worker_processes_gives_the_same_batches(tiny_cache):
    inline = list(EpochReader(tiny_cache, "train", SMALL).batches(epoch=0, start_step=3))
    workers = EpochReader(tiny_cache, "train", dataclasses.replace(SMALL, num_workers=1))
    assert all(same_batch(a, b) for a, b in zip(list(workers.batches(epoch=0, start_step=3)), inline, strict=True))


def order(url: str, settings: LoaderSettings, epoch: int) -> list[list[tuple[int, bytes]]]:
    return [delivered([b]) for b in EpochReader(url, "train", settings).batches(epoch)]


def test_each_epoch_has_its_own_order_and_the_same_seed_and_epoch_repeat_it(tiny_cache):
    first = order(tiny_cache, SMALL, 0)
    assert order(tiny_cache, SMALL, 0) == first
    assert order(tiny_cache, SMALL, 1) != first
    assert order(tiny_cache, dataclasses.replace(SMALL, seed=1), 0) != first
    assert sorted(sum(order(tiny_cache, SMALL, 1), [])) == sorted(sum(first, []))  # same sequences, new order


@pytest.mark.parametrize("change", [{"batch_size": 3}, {"seed": 7}, {"shuffle_blocks": 4}, {"world": 3}])
def test_a_resume_state_from_other_settings_is_refused_naming_the_field(tiny_cache, change):
    state = EpochReader(tiny_cache, "train", SMALL, 0, 2).state(epoch=1, step=3).to_dict()
    world = change.get("world", 2)
    settings = dataclasses.replace(SMALL, **{k: v for k, v in change.items() if k != "world"})
    (field, new), = change.items()
    with pytest.raises(LoaderError, match=rf"{field} was {state[field]!r} when the checkpoint was written, now {new!r}"):
        EpochReader(tiny_cache, "train", settings, 0, world).check_resume(state)


def test_a_resume_state_from_another_cache_is_refused_and_a_matching_one_accepted(tiny_cache, packed_cache):
    state = EpochReader(tiny_cache, "train", SMALL, 1, 2).state(epoch=1, step=3).to_dict()
    with pytest.raises(LoaderError, match="cache_id"):
        EpochReader(packed_cache, "train", SMALL, 1, 2).check_resume(state)
    more_workers = dataclasses.replace(SMALL, num_workers=2, prefetch=1)  # reading faster does not change the order
    assert EpochReader(tiny_cache, "train", more_workers, 1, 2).check_resume(state) == ResumeState(**state)


# ------------------------------------------------------------------------------------------- worker failures


def test_a_killed_worker_process_fails_the_epoch_with_its_exit_code_instead_of_hanging(tiny_cache):
    # One block per window and prefetch 1: most windows are still unread when the worker dies.
    settings = dataclasses.replace(SMALL, shuffle_blocks=1, num_workers=1, prefetch=1)
    reader = EpochReader(tiny_cache, "train", settings)
    assert len(list(reader.tasks(0))) > 4, "too few windows: the worker could finish the epoch before it is killed"
    before = set(multiprocessing.active_children())
    batches = reader.batches(epoch=0)
    next(batches)
    workers = [p for p in multiprocessing.active_children() if p not in before]
    assert len(workers) == 1
    os.kill(workers[0].pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(LoaderError, match=rf"worker process {workers[0].pid} died with exit code -9 \(killed by SIGKILL") as e:
        for _ in batches:
            assert time.monotonic() - t0 < 30, "the reader kept delivering long after its only worker died"
    assert time.monotonic() - t0 < 10
    assert "\n" not in str(e.value), "the error should be one line, not torchdata's wrapped traceback"


RELEASE = threading.Event()  # lets the mapper's blocked worker thread finish once the test is done


def blocked_identity(x: int) -> int:
    RELEASE.wait(timeout=30)
    return x


def test_stopping_a_mapper_ends_a_next_that_waits_for_its_workers():
    """The one call into torchdata's private attributes (checked against 0.11.0): if a torchdata upgrade renames
    them, a dead worker's epoch would leave the watch's helper thread waiting forever; this fails instead."""
    mapper = ParallelMapper(IterableWrapper(range(4)), map_fn=blocked_identity, num_workers=1, in_order=True,
                            method="thread")
    mapper.reset()
    ended = []

    def wait() -> None:
        try:
            mapper.next()
        except StopIteration:
            ended.append("stopped")

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    try:
        time.sleep(0.3)
        assert waiter.is_alive(), "next returned before its worker finished; the test proves nothing"
        _stop_mapper_threads(mapper)
        waiter.join(timeout=5)
        assert not waiter.is_alive(), "next still waits after the mapper was stopped"
        assert ended == ["stopped"]
    finally:
        RELEASE.set()
