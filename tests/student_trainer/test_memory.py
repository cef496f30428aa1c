"""Window buffers (student_trainer/memory.py, through collate.PackedBatches): a buffer is reused only once nothing
of its window is left, also across processes, and a worker process keeps freed memory."""

from __future__ import annotations

import dataclasses
import gc
import multiprocessing
import os
import resource
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch

from formats.schema import make_fields
import student_trainer.collate as collation
from student_trainer import memory
from student_trainer.batch import Batch
from student_trainer.collate import PackedBatches, collate
from student_trainer.errors import LoaderError
from student_trainer.loader import EpochReader, LoaderSettings
from tests.student_trainer.sequences import K, same_batch, synthetic

SMALL = LoaderSettings(batch_size=2, shuffle_blocks=2, num_workers=0)


# ------------------------------------------------------------------------------------------- window buffers


def window(seed: int) -> list[list[dict[str, np.ndarray]]]:
    """Two batches of two sequences and an empty rank slice, the same sizes for every seed."""
    rng = np.random.default_rng(seed)
    seqs = [synthetic(rng.integers(1, 50, n).tolist(), doc=seed * 10 + i, seed=seed * 10 + i) for i, n in enumerate([9, 5, 7, 3])]
    return [seqs[:2], seqs[2:], []]


def expected(seqs_per_batch: list[list[dict[str, np.ndarray]]]) -> list[Batch]:
    return [collate(seqs, [], fields=make_fields(K, "F32")) for seqs in seqs_per_batch]


@pytest.fixture()
def empty_pool(monkeypatch):
    """This process's window buffer pool, empty (earlier tests leave free buffers of the same size in it)."""
    monkeypatch.setattr(memory, "_SLOTS", [])


def test_without_memfd_a_window_buffer_lives_in_an_unlinked_temporary_file(empty_pool, monkeypatch):
    monkeypatch.delattr(os, "memfd_create")  # as on macOS
    fields = make_fields(K, "F32")
    packed = PackedBatches(window(1), [], 0, fields)
    assert os.fstat(packed._slot.fd).st_nlink == 0  # a file nobody can open by name, gone once closed
    assert all(same_batch(packed[i], b) for i, b in enumerate(expected(window(1))))


def test_a_window_buffer_is_reused_only_once_no_tensor_or_storage_of_its_batches_is_left(empty_pool):
    fields = make_fields(K, "F32")
    first = PackedBatches(window(1), [], 0, fields)
    slot = first._slot
    kept_ids, kept_storage = first[0].topk_ids, first[1].topk_logprobs.untyped_storage()
    want = expected(window(1))
    del first
    gc.collect()
    second = PackedBatches(window(2), [], 0, fields)  # must not be written over the first window's bytes
    assert second._slot is not slot
    assert torch.equal(kept_ids, want[0].topk_ids)
    del kept_ids
    gc.collect()
    third = PackedBatches(window(3), [], 0, fields)  # a storage of the first window is still held
    assert third._slot is not slot
    reread = torch.frombuffer(bytearray(kept_storage), dtype=torch.uint8)  # the storage's bytes, copied out
    assert reread.numel() > 0 and bool(third._slot.mapping[0]) and slot.mapping[0] == 1
    del kept_storage, reread
    gc.collect()
    assert slot.mapping[0] == 0
    fourth = PackedBatches(window(4), [], 0, fields)
    assert fourth._slot is slot, "a free buffer of the right size was not reused"
    assert all(same_batch(a, b) for a, b in zip([fourth[i] for i in range(len(fourth))], expected(window(4)), strict=True))
    assert all(same_batch(a, b) for a, b in zip([second[i] for i in range(len(second))], expected(window(2)), strict=True))


def test_batches_from_a_worker_that_reuses_its_buffers_equal_the_in_process_ones_kept_or_dropped(tiny_cache, monkeypatch):
    settings = dataclasses.replace(SMALL, shuffle_blocks=1, prefetch=1)  # small windows: buffers come round again
    inline = list(EpochReader(tiny_cache, "train", settings, hidden_layers=[1]).batches(epoch=3))
    buffers = []  # the inode of each window's buffer as the trainer side receives it

    class Spy:
        def __init__(self, dupfd):
            self.dupfd = dupfd

        def detach(self):
            fd = self.dupfd.detach()
            buffers.append(os.fstat(fd).st_ino)
            return fd

    received = collation._received
    monkeypatch.setattr(collation, "_received", lambda dupfd, *rest: received(Spy(dupfd), *rest))
    kept = []
    worker = EpochReader(tiny_cache, "train", dataclasses.replace(settings, num_workers=1), hidden_layers=[1])
    for i, (batch, want) in enumerate(zip(worker.batches(epoch=3), inline, strict=True)):
        assert same_batch(batch, want), f"batch {i} differs from the in-process one"
        if i == 0:
            kept.append((i, batch))  # held on while later windows are read: its buffer must not be written over
        del batch
        gc.collect()
    assert all(same_batch(batch, inline[i]) for i, batch in kept)
    assert len(set(buffers)) < len(buffers), f"no buffer was reused over {len(buffers)} windows; the test proves little"


def test_a_window_sent_to_another_process_stays_intact_until_it_lets_go_and_then_its_buffer_is_reused(empty_pool):
    fields = make_fields(K, "F32")
    sent = PackedBatches(window(5), [], 0, fields, shared=True)
    slot = sent._slot
    received = ForkingPickler.loads(bytes(ForkingPickler.dumps(sent)))  # what a worker's queue does, both ends
    del sent
    gc.collect()
    batches = [received[i] for i in range(len(received))]
    del received
    assert slot.mapping[0] == 1, "the sender's buffer turned free while the receiver still maps it"
    other = PackedBatches(window(6), [], 0, fields, shared=True)
    assert other._slot is not slot
    assert all(same_batch(a, b) for a, b in zip(batches, expected(window(5)), strict=True))
    del batches
    gc.collect()
    assert slot.mapping[0] == 0, "the receiver let go but the sender's buffer stayed busy"
    again = PackedBatches(window(7), [], 0, fields, shared=True)
    assert again._slot is slot
    with pytest.raises(LoaderError, match="shared=True"):
        ForkingPickler.dumps(PackedBatches(window(8), [], 0, fields))


def faults_of_a_second_large_block(keep_freed_memory: bool) -> int:
    """Page faults of allocating and filling 64 MiB again right after freeing the same (run in a fresh process)."""
    if keep_freed_memory:
        memory.keep_freed_memory()
    block = bytearray(64 << 20)  # malloc + fill, like a window's decoded arrays (numpy would ask for huge pages)
    del block
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = bytearray(64 << 20)
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_a_worker_process_keeps_freed_memory_so_the_next_window_does_not_fault_its_pages_in_again():
    pages = (64 << 20) // 4096
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(1) as pool:
        default = pool.apply(faults_of_a_second_large_block, (False,))
    with spawn.Pool(1) as pool:
        kept = pool.apply(faults_of_a_second_large_block, (True,))
    assert default > pages // 2, f"{default} faults: malloc kept the block anyway; the test cannot tell the difference"
    assert kept < pages // 20, f"{kept} page faults for {pages} pages: the freed block went back to the kernel"


