"""student_trainer.loader on real caches built by the tiny teacher: every sequence once per epoch across ranks and
workers, exact mid-epoch resume, per-epoch shuffles, resume-state checks, and collation (shift, masks, dtypes)."""

from __future__ import annotations

import dataclasses
import gc
import os
from collections import Counter

import numpy as np
import pytest
import torch

from formats.reader import open_cache
from formats.schema import from_float32, make_fields, to_float32
from student_trainer.loader import (
    IGNORE,
    Batch,
    EpochReader,
    LoaderError,
    LoaderSettings,
    PackedBatches,
    ResumeState,
    collate,
)

# Small batches and windows so that one epoch of the tiny cache has several windows and short last batches.
SMALL = LoaderSettings(batch_size=2, shuffle_blocks=2, num_workers=0)


def identity(doc: int, ids: np.ndarray) -> tuple[int, bytes]:
    """A sequence's identity: its document and its tokens (trailing zeros dropped, as batches pad with 0)."""
    return int(doc), np.trim_zeros(np.asarray(ids, dtype=np.int64), "b").tobytes()


def stored_sequences(url: str, split: str) -> dict[tuple[int, bytes], dict[str, np.ndarray]]:
    """identity -> the stored sequence, for every sequence of the split (identities are unique)."""
    out = {}
    for block in open_cache(url).iter_blocks(split):
        for j in range(len(block)):
            seq = block.get(j)
            key = identity(seq["doc_index"], seq["input_ids"])
            assert key not in out, "two sequences share an identity; the coverage tests would prove less"
            out[key] = seq
    return out


def delivered(batches: list[Batch]) -> list[tuple[int, bytes]]:
    """Identities of the real rows (filler rows, doc_index -1, left out) of a rank's batches."""
    return [identity(d, b.input_ids[r].numpy()) for b in batches for r, d in enumerate(b.doc_index.tolist()) if d >= 0]


def same_batch(a: Batch, b: Batch) -> bool:
    for f in dataclasses.fields(Batch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif isinstance(x, dict):
            if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
                return False
        elif x != y:
            return False
    return True


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


# ------------------------------------------------------------------------------------------- collation

K = 4


def synthetic(ids: list[int], doc: int, seed: int, lp_dtype: str = "F32", **extra) -> dict[str, np.ndarray]:
    """A stored sequence as the reader returns it (token arrays, `doc_index` scalar); the last target is NaN."""
    rng = np.random.default_rng(seed)
    n = len(ids)
    lp = np.sort(np.log(rng.dirichlet(np.ones(K + 1), size=n)[:, :K]).astype(np.float32), axis=1)[:, ::-1]
    target = rng.uniform(-5, 0, n).astype(np.float32)
    target[-1] = np.nan
    return {"input_ids": np.asarray(ids, np.int32), "topk_ids": rng.integers(0, 50, (n, K)).astype(np.int32),
            "topk_logprobs": from_float32(np.ascontiguousarray(lp), lp_dtype),
            "tail_logmass": rng.uniform(-6, -1, n).astype(np.float32), "target_logprob": target,
            "doc_index": np.int64(doc), **extra}


def test_labels_are_the_next_tokens_and_padding_is_masked():
    a, b = synthetic([5, 6, 7, 8, 9], doc=3, seed=0), synthetic([20, 21, 22], doc=4, seed=1)
    batch = collate([a, b], [], pad_to=7)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 0, 0], [20, 21, 22, 0, 0, 0, 0]]
    assert batch.labels.tolist() == [[6, 7, 8, 9, IGNORE, IGNORE, IGNORE], [21, 22] + [IGNORE] * 5]
    assert torch.equal(batch.kd_mask, batch.labels != IGNORE)
    # padding restarts the positions: it is a document of its own, which no real token attends to
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 0, 1, 2, 3]]
    assert batch.doc_index.tolist() == [3, 4] and batch.num_tokens == 8
    assert torch.equal(batch.topk_ids[0, :5], torch.from_numpy(a["topk_ids"]).long())
    assert torch.equal(batch.topk_logprobs[1, :3], torch.from_numpy(b["topk_logprobs"]))
    assert torch.isinf(batch.tail_logmass[1, 3:]).all() and (batch.tail_logmass[1, 3:] < 0).all()
    assert batch.target_logprob[0, :4].tolist() == a["target_logprob"][:4].tolist()
    assert batch.target_logprob[0, 4:].eq(0).all() and not batch.target_logprob.isnan().any()


def test_loss_mask_positions_and_packed_document_starts_are_not_targets():
    ids = [10, 11, 12, 13, 14, 15, 16]
    seq = synthetic(ids, doc=0, seed=2, loss_mask=np.array([1, 1, 0, 1, 1, 1, 1], np.uint8),
                    position_ids=np.array([0, 1, 2, 0, 1, 2, 3], np.int32))
    batch = collate([seq], [])
    # position i predicts token i+1: not when token 2 is outside the loss mask, nor when token 3 starts a document
    assert batch.labels.tolist() == [[11, IGNORE, IGNORE, 14, 15, 16, IGNORE]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    assert batch.target_logprob[0, [1, 2, 6]].eq(0).all()


def test_an_empty_rank_slice_collates_to_one_fully_masked_row_shaped_like_the_cache(tiny_cache):
    fields = open_cache(tiny_cache).manifest.fields
    filler = collate([], [1, 2], fields=fields)
    assert filler.doc_index.tolist() == [-1] and filler.num_tokens == 0
    assert filler.input_ids.shape == (1, 1) and not filler.kd_mask.any() and filler.labels.eq(IGNORE).all()
    assert filler.topk_ids.shape == (1, 1, 8) and filler.sample_ids.shape == (1, 1, 16)
    assert {layer: h.shape for layer, h in filler.hidden.items()} == {1: (1, 1, 128), 2: (1, 1, 128)}
    # and the reader hands it out when a window's last global batch has fewer sequences than ranks
    fillers = [b for rank in range(3) for b in EpochReader(tiny_cache, "train", SMALL, rank, 3, [1, 2]).batches(0)
               if b.doc_index.tolist() == [-1]]
    assert fillers, "no rank slice was empty; the test proves nothing"
    assert all(same_batch(f, filler) for f in fillers)


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_half_precision_logprobs_and_hidden_states_are_decoded_to_float32(dtype):
    d = 6
    rng = np.random.default_rng(3)
    hidden = rng.normal(size=(5, d)).astype(np.float32)
    seq = synthetic([1, 2, 3, 4, 5], doc=0, seed=4, lp_dtype=dtype, **{"hidden/2": from_float32(hidden, dtype)})
    batch = collate([seq], [2])
    assert batch.topk_logprobs.dtype == torch.float32 and batch.hidden[2].dtype == torch.float32
    np.testing.assert_array_equal(batch.topk_logprobs[0].numpy(), to_float32(seq["topk_logprobs"], dtype))
    np.testing.assert_array_equal(batch.hidden[2][0].numpy(), to_float32(seq["hidden/2"], dtype))
    np.testing.assert_allclose(batch.hidden[2][0].numpy(), hidden, rtol=1e-2, atol=1e-3)  # values, not raw bits


def test_the_packed_cache_decodes_bf16_and_f16_and_masks_every_document_start(packed_cache):
    fields = open_cache(packed_cache).manifest.fields
    assert fields["topk_logprobs"].dtype == "BF16" and fields["hidden/1"].dtype == "F16"
    stored = stored_sequences(packed_cache, "train")
    starts = 0
    for batch in EpochReader(packed_cache, "train", SMALL, hidden_layers=[1]).batches(0):
        for r, doc in enumerate(batch.doc_index.tolist()):
            seq = stored[identity(doc, batch.input_ids[r].numpy())]
            n = len(seq["input_ids"])
            np.testing.assert_array_equal(batch.topk_logprobs[r, :n].numpy(), to_float32(seq["topk_logprobs"], "BF16"))
            np.testing.assert_array_equal(batch.hidden[1][r, :n].numpy(), to_float32(seq["hidden/1"], "F16"))
            assert batch.position_ids[r, :n].tolist() == seq["position_ids"].tolist()
            inner = np.flatnonzero(seq["position_ids"][1:] == 0)  # position i predicts the start of a document
            starts += len(inner)
            assert batch.labels[r, inner].eq(IGNORE).all()
            others = np.setdiff1d(np.arange(n - 1), inner)
            assert batch.labels[r, others].tolist() == seq["input_ids"][1:][others].tolist()
    assert starts > 0, "no sequence packed two documents; the test proves nothing"


def test_the_filler_batch_takes_k_sample_slots_and_hidden_sizes_from_the_field_table():
    fields = make_fields(K, "F16", sample_slots=3, hidden={5: (7, "BF16")})
    filler = collate([], [5], fields=fields)
    assert filler.topk_logprobs.shape == (1, 1, K) and filler.sample_counts.shape == (1, 1, 3)
    assert filler.hidden[5].shape == (1, 1, 7) and filler.sample_ids.eq(-1).all()


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
    from student_trainer import loader

    monkeypatch.setattr(loader, "_SLOTS", [])


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
    import os

    from student_trainer import loader

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

    received = loader._received
    monkeypatch.setattr(loader, "_received", lambda dupfd, *rest: received(Spy(dupfd), *rest))
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
    from multiprocessing.reduction import ForkingPickler

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
    import resource

    from student_trainer import loader

    if keep_freed_memory:
        loader._keep_freed_memory()
    block = bytearray(64 << 20)  # malloc + fill, like a window's decoded arrays (numpy would ask for huge pages)
    del block
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = bytearray(64 << 20)
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_a_worker_process_keeps_freed_memory_so_the_next_window_does_not_fault_its_pages_in_again():
    import multiprocessing

    pages = (64 << 20) // 4096
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(1) as pool:
        default = pool.apply(faults_of_a_second_large_block, (False,))
    with spawn.Pool(1) as pool:
        kept = pool.apply(faults_of_a_second_large_block, (True,))
    assert default > pages // 2, f"{default} faults: malloc kept the block anyway; the test cannot tell the difference"
    assert kept < pages // 20, f"{kept} page faults for {pages} pages: the freed block went back to the kernel"


# ------------------------------------------------------------------------------------------- worker failures


def test_a_killed_worker_process_fails_the_epoch_with_its_exit_code_instead_of_hanging(tiny_cache):
    import multiprocessing
    import os
    import signal
    import time

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
