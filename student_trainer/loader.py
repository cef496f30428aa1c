"""Streaming training batches out of a cache: shuffled, split across ranks and workers, exactly resumable.

The order of an epoch is a pure function of (seed, epoch, the cache's read blocks, batch size, world
size): blocks (Parquet row groups / Zarr token blocks) are permuted, taken `shuffle_blocks` at a time as
a shuffle window, and the window's sequences are permuted and cut into global batches of
`batch_size * world` sequences, each split across ranks. Every sequence of the split is delivered once
per epoch, to one rank. A window never shares a batch with the next, so its last global batch may be
short (a rank may then get an empty batch, which collates to one fully masked row so DDP still steps).

The resume state is the smallest set of primitives that recomputes everything: {seed, epoch, step
within the epoch, batch size, world, shuffle window, cache id}; on resume it is checked against the
current settings, naming the field that differs.

The pipeline is torchdata.nodes: window tasks -> ParallelMapper (worker processes read and collate one
window each, in order, into one shared-memory buffer, reused once the trainer has let go of the window it
held: `PackedBatches`) -> Unbatcher -> PinMemory -> Prefetcher. Workers open the cache themselves (spawned,
never forked: zarr's event loop thread does not survive a fork). A worker that dies (SIGKILL, OOM) fails the
epoch with a LoaderError (`WatchedMapper`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import os
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torchdata.nodes import BaseNode  # light once torch is loaded (~25 ms)

from formats.errors import KdError
from formats.reader import Cache, open_cache
from formats.schema import FieldSpec, SeqBlock, top_k_of

IGNORE = -100


class LoaderError(KdError):
    """A resume state or setting that does not fit this cache, or a reader process that died."""


@dataclass
class Batch:
    """One rank's batch. B = sequences (>= 1), T = padded length, k = top-k, S = sample slots, d = hidden.

    Position i of a row holds the teacher's distribution for token i+1 (SPEC.md); `labels[b, i]` is that
    token, or -100 where it is not a target: past the end, not in the loss mask, or the first token of
    the next packed document. `kd_mask` is `labels != -100`.
    """

    input_ids: torch.Tensor  # (B, T) int64, padded with 0
    position_ids: torch.Tensor  # (B, T) int64; restarts at 0 at each packed document and for padding
    labels: torch.Tensor  # (B, T) int64
    kd_mask: torch.Tensor  # (B, T) bool
    topk_ids: torch.Tensor  # (B, T, k) int64
    topk_logprobs: torch.Tensor  # (B, T, k) float32
    tail_logmass: torch.Tensor  # (B, T) float32
    target_logprob: torch.Tensor  # (B, T) float32, 0 where not a target
    sample_ids: torch.Tensor | None = None  # (B, T, S) int64, -1 padding
    sample_counts: torch.Tensor | None = None  # (B, T, S) float32
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, T, d) float32
    doc_index: torch.Tensor | None = None  # (B,) int64; -1 for the filler row of an empty batch
    num_tokens: int = 0  # real (unpadded) tokens in the batch
    byte_offsets: torch.Tensor | None = None  # (B, T, 2) int64 when the cache has them; -1 in padding (xtok_align.py)

    def map(self, fn) -> "Batch":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = fn(v)
            elif isinstance(v, dict):
                v = {k: fn(t) for k, t in v.items()}
            out[f.name] = v
        return Batch(**out)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return self.map(lambda t: t.pin_memory())


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
class Block:
    """A read unit: sequences [start, stop) of shard number `shard` of the split."""

    shard: int
    start: int
    stop: int


def cache_id(cache: Cache, split: str) -> str:
    """Identifies the split's content: its shards' content checksums."""
    h = hashlib.sha256()
    for s in cache.shards(split):
        h.update(f"{s.path}\t{s.content_sha256}\n".encode())
    return h.hexdigest()[:16]


def list_blocks(cache: Cache, split: str) -> list[Block]:
    blocks = []
    for i, entry in enumerate(cache.shards(split)):
        blocks += [Block(i, a, b) for a, b in cache.open_shard(entry).block_ranges()]
    return blocks


def epoch_windows(blocks: list[Block], seed: int, epoch: int, window: int, global_batch: int) -> list[list[list[tuple[int, int]]]]:
    """The epoch's windows, each a list of global batches of (block number, sequence in block)."""
    rng = np.random.Generator(np.random.PCG64([seed, epoch]))
    order = rng.permutation(len(blocks))
    windows = []
    for w in range(0, len(order), window):
        members = [(int(b), j) for b in order[w : w + window] for j in range(blocks[b].stop - blocks[b].start)]
        members = [members[i] for i in rng.permutation(len(members))]
        windows.append([members[i : i + global_batch] for i in range(0, len(members), global_batch)])
    return windows


def rank_slice(items: list, rank: int, world: int) -> list:
    """Rank's share of a global batch: contiguous, sizes differ by at most one."""
    base, extra = divmod(len(items), world)
    start = rank * base + min(rank, extra)
    return items[start : start + base + (rank < extra)]


def _layout(b: int, t: int, k: int, s_n: int, hidden: dict[int, int],
            offsets: bool = False) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(name, shape, dtype) of every array of a collated batch of b rows padded to t (hidden: layer -> d)."""
    i64, f32 = np.dtype(np.int64), np.dtype(np.float32)
    out = [("input_ids", (b, t), i64), ("position_ids", (b, t), i64), ("labels", (b, t), i64),
           ("kd_mask", (b, t), np.dtype(bool)), ("topk_ids", (b, t, k), i64), ("topk_logprobs", (b, t, k), f32),
           ("tail_logmass", (b, t), f32), ("target_logprob", (b, t), f32)]
    if s_n:
        out += [("sample_ids", (b, t, s_n), i64), ("sample_counts", (b, t, s_n), f32)]
    out += [(f"hidden/{layer}", (b, t, d), f32) for layer, d in hidden.items()]
    out += [("byte_offsets", (b, t, 2), i64)] if offsets else []
    return out + [("doc_index", (b,), i64)]


def _shape_of(seqs: list[dict[str, np.ndarray]], hidden_layers: list[int], pad_to: int):
    first = seqs[0]
    t = max(max(len(s["input_ids"]) for s in seqs), pad_to)
    s_n = first["sample_ids"].shape[1] if "sample_ids" in first else 0
    hidden = {layer: first[f"hidden/{layer}"].shape[1] for layer in hidden_layers}
    k = first["topk_ids"].shape[1] if "topk_ids" in first else 0  # 0: a samples-only cache
    return _layout(len(seqs), t, k, s_n, hidden, "byte_offsets" in first)


def _half_into(dst: np.ndarray, src: np.ndarray) -> None:
    """Stored F32/F16/BF16 values into float32 `dst`. BF16 bits go straight into the upper half of each
    float32 (widen, then shift in place): no temporaries, two passes over the output."""
    if src.dtype == np.uint16:
        bits = dst.view(np.uint32)
        bits[...] = src
        bits <<= 16
    else:
        dst[...] = src


def _fill(seqs: list[dict[str, np.ndarray]], out: dict[str, np.ndarray], hidden_layers: list[int]) -> None:
    """Write the sequences into the (uninitialised) arrays of `out`, padding included."""
    t = out["input_ids"].shape[1]
    for r, s in enumerate(seqs):
        n = len(s["input_ids"])
        ids = s["input_ids"]
        out["input_ids"][r, :n] = ids
        out["input_ids"][r, n:] = 0
        p = s.get("position_ids")
        out["position_ids"][r, :n] = np.arange(n) if p is None else p
        out["position_ids"][r, n:] = np.arange(t - n)  # padding is its own "document": nothing real attends to it
        nxt_ok = np.ones(n - 1, bool)
        if "loss_mask" in s:
            nxt_ok &= s["loss_mask"][1:].astype(bool)
        if p is not None:
            nxt_ok &= p[1:] != 0  # the first token of the next packed document is not predicted
        out["labels"][r, : n - 1] = np.where(nxt_ok, ids[1:], IGNORE)
        out["labels"][r, max(n - 1, 0):] = IGNORE
        if "topk_ids" in s:  # a samples-only cache (k = 0) has none: its batch holds (B, T, 0) tensors
            out["topk_ids"][r, :n] = s["topk_ids"]
            out["topk_ids"][r, n:] = 0
            _half_into(out["topk_logprobs"][r, :n], s["topk_logprobs"])
            out["topk_logprobs"][r, n:] = 0
        out["tail_logmass"][r, :n] = s["tail_logmass"]
        out["tail_logmass"][r, n:] = -np.inf
        out["target_logprob"][r, : n - 1] = np.where(nxt_ok, s["target_logprob"][: n - 1], 0.0)
        out["target_logprob"][r, max(n - 1, 0):] = 0
        if "sample_ids" in out:
            out["sample_ids"][r, :n] = s["sample_ids"]
            out["sample_ids"][r, n:] = -1
            out["sample_counts"][r, :n] = s["sample_counts"]
            out["sample_counts"][r, n:] = 0
        for layer in hidden_layers:
            h = out[f"hidden/{layer}"]
            _half_into(h[r, :n], s[f"hidden/{layer}"])
            h[r, n:] = 0
        out["doc_index"][r] = int(s["doc_index"])
        if "byte_offsets" in out:
            out["byte_offsets"][r, :n] = s["byte_offsets"]
            out["byte_offsets"][r, n:] = -1
    np.not_equal(out["labels"], IGNORE, out=out["kd_mask"])


def _as_batch(arrays: dict[str, torch.Tensor], num_tokens: int) -> Batch:
    return Batch(
        input_ids=arrays["input_ids"], position_ids=arrays["position_ids"], labels=arrays["labels"],
        kd_mask=arrays["kd_mask"], topk_ids=arrays["topk_ids"], topk_logprobs=arrays["topk_logprobs"],
        tail_logmass=arrays["tail_logmass"], target_logprob=arrays["target_logprob"],
        sample_ids=arrays.get("sample_ids"), sample_counts=arrays.get("sample_counts"),
        hidden={int(n[7:]): a for n, a in arrays.items() if n.startswith("hidden/")},
        doc_index=arrays["doc_index"], num_tokens=num_tokens, byte_offsets=arrays.get("byte_offsets"),
    )


def collate(seqs: list[dict[str, np.ndarray]], hidden_layers: list[int], pad_to: int = 0,
            fields: dict[str, FieldSpec] | None = None) -> Batch:
    """Pad and shift sequences (dicts of stored arrays) into a Batch; see Batch for the conventions.
    An empty list gives the filler batch, shaped after the cache's field table `fields`."""
    if not seqs:
        return _filler_batch(fields, hidden_layers)
    out = {name: np.empty(shape, dtype) for name, shape, dtype in _shape_of(seqs, hidden_layers, pad_to)}
    _fill(seqs, out, hidden_layers)
    return _as_batch({n: torch.from_numpy(a) for n, a in out.items()}, sum(len(s["input_ids"]) for s in seqs))


_ALIGN = 64


class PackedBatches:
    """A window's batches collated into one flat buffer (a list-like of Batch for torchdata's Unbatcher).

    A worker process hands its results to the trainer through torch's shared-memory pickler, which costs a
    shared-memory segment and a file-descriptor hand-off (a socket round trip) per tensor: measured at
    about 5 s per million tokens with a dozen tensors per batch, more than decoding the cache. Here all
    of a window's batch arrays are carved from one buffer, filled in place by collation, and cross the
    process boundary as one file descriptor; the trainer side rebuilds each Batch as views of it (no copy).
    The buffer is a reused slot of this process's shared-memory pool (`_take_slot`): fresh shared memory
    is written at ~1.2 GB/s here (every 4 KiB page faults, is zeroed and accounted), which made a worker
    twice as slow as the same work in the trainer process. With `shared` (in a worker process) the object
    is only for sending: it pickles as the slot's descriptor and is rebuilt on the other side.
    """

    def __init__(self, seqs_per_batch: list[list[dict[str, np.ndarray]]], hidden_layers: list[int], pad_to: int,
                 fields: dict[str, FieldSpec], shared: bool = False):
        layouts, offset = [], 0
        for seqs in seqs_per_batch:
            if not seqs:
                layouts.append(None)
                continue
            entries = []
            for name, shape, dtype in _shape_of(seqs, hidden_layers, pad_to):
                entries.append((name, offset, shape, dtype.str))
                offset += -(-int(np.prod(shape)) * dtype.itemsize // _ALIGN) * _ALIGN
            layouts.append((entries, sum(len(s["input_ids"]) for s in seqs)))
        self.layouts, self.nbytes = layouts, offset
        self.fillers = {i: _filler_batch(fields, hidden_layers) for i, layout in enumerate(layouts) if layout is None}
        self._slot = _take_slot(offset)
        flat = np.frombuffer(self._slot.mapping, np.uint8, count=offset, offset=_HEADER)
        for seqs, layout in zip(seqs_per_batch, layouts):
            if layout is not None:
                _fill(seqs, {name: np.ndarray(shape, np.dtype(dt), buffer=flat, offset=off)
                             for name, off, shape, dt in layout[0]}, hidden_layers)
        del flat  # no export of the mapping may outlive this: the pool may remap a free slot
        self.buffer = None if shared else _lend(self._slot, offset)

    def __reduce__(self):
        from multiprocessing.reduction import DupFd

        if self.buffer is not None:
            raise LoaderError("PackedBatches: only a window collated with shared=True can be sent to another process")
        return _received, (DupFd(self._slot.fd), self.nbytes, self.layouts, self.fillers)

    def __len__(self) -> int:
        return len(self.layouts)

    def __getitem__(self, i: int) -> Batch:
        if i in self.fillers:
            return self.fillers[i]
        entries, num_tokens = self.layouts[i]
        arrays = {}
        for name, off, shape, dt in entries:
            dtype = _TORCH_DTYPE[dt]
            nbytes = int(np.prod(shape)) * dtype.itemsize
            arrays[name] = self.buffer[off : off + nbytes].view(dtype).view(shape)
        return _as_batch(arrays, num_tokens)


# A window buffer's slot: a memfd (shared memory that any process it is handed to can map) with a header
# whose byte 0 is 1 while the trainer may still read the window and 0 once every tensor of it is gone. A
# process keeps up to _MAX_SLOTS slots mapped and collates each window into a free one, so after the first
# few windows collation writes pages that are already there instead of faulting in fresh ones.
_HEADER = 64
_MAX_SLOTS = 8
_SLOT_ROUND = 1 << 20


@dataclass
class _Slot:
    fd: int
    mapping: mmap.mmap  # header + capacity bytes, mapped for as long as the slot is in the pool
    capacity: int


_SLOTS: list[_Slot] = []  # this process's pool, oldest first
_SLOTS_LOCK = threading.Lock()  # two in-process readers (say train and eval) collate on two prefetch threads


def _take_slot(n: int) -> _Slot:
    """A free slot of this process's pool holding at least n bytes, marked busy: the smallest that fits, else a
    free one grown, else a new one (dropping the oldest slot past _MAX_SLOTS: a busy one dropped stays mapped
    by whoever holds its window, and its memory goes when they let go)."""
    with _SLOTS_LOCK:
        return _take_slot_locked(n)


def _take_slot_locked(n: int) -> _Slot:
    free = [s for s in _SLOTS if s.mapping[0] == 0]
    fits = [s for s in free if s.capacity >= n]
    if fits:
        slot = min(fits, key=lambda s: s.capacity)
    else:
        capacity = -(-(n + n // 4) // _SLOT_ROUND) * _SLOT_ROUND  # room for larger windows to come
        if free:  # grow: the pages it has stay, only the new ones are faulted in
            slot = max(free, key=lambda s: s.capacity)
            os.ftruncate(slot.fd, _HEADER + capacity)
            slot.mapping, slot.capacity = mmap.mmap(slot.fd, _HEADER + capacity), capacity
        else:
            if len(_SLOTS) >= _MAX_SLOTS:
                os.close(_SLOTS.pop(0).fd)
            fd = _shared_fd()
            os.ftruncate(fd, _HEADER + capacity)
            slot = _Slot(fd, mmap.mmap(fd, _HEADER + capacity), capacity)
            _SLOTS.append(slot)
    slot.mapping[0] = 1
    return slot


def _shared_fd() -> int:
    """A descriptor of shared memory that can be handed to another process: a memfd where the OS has them
    (Linux), else an unlinked temporary file (macOS)."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("kdcache-window", os.MFD_CLOEXEC)
    import tempfile

    fd, path = tempfile.mkstemp(prefix="kdcache-window-")
    os.unlink(path)
    return fd


def _lend(slot: _Slot, n: int) -> torch.Tensor:
    """The slot's first n bytes as a uint8 tensor; the slot turns free when that tensor's storage is freed
    (the last tensor or storage of the window gone), not before."""
    if n == 0:
        slot.mapping[0] = 0
        return torch.empty(0, dtype=torch.uint8)
    view = memoryview(slot.mapping)[_HEADER : _HEADER + n]
    weakref.finalize(view, _set_free, slot.mapping)  # the tensor's storage holds `view` until it is freed
    return torch.frombuffer(view, dtype=torch.uint8)


def _set_free(mapping: mmap.mmap) -> None:
    mapping[0] = 0


def _received(dupfd, nbytes: int, layouts: list, fillers: dict[int, Batch]) -> PackedBatches:
    """Trainer side of a window sent by a worker: map the worker's slot and view the window in it. When the
    window's storage is freed the slot's busy byte is cleared through the descriptor, and the worker reuses it."""
    fd = dupfd.detach()
    mapping = mmap.mmap(fd, _HEADER + nbytes)
    out = PackedBatches.__new__(PackedBatches)
    out.layouts, out.nbytes, out.fillers, out._slot = layouts, nbytes, fillers, None
    if nbytes == 0:
        _release_sent(fd)
        out.buffer = torch.empty(0, dtype=torch.uint8)
        return out
    view = memoryview(mapping)[_HEADER : _HEADER + nbytes]
    weakref.finalize(view, _release_sent, fd)
    out.buffer = torch.frombuffer(view, dtype=torch.uint8)
    return out


def _release_sent(fd: int) -> None:
    os.pwrite(fd, b"\0", 0)
    os.close(fd)


_TORCH_DTYPE = {np.dtype(np.int64).str: torch.int64, np.dtype(np.float32).str: torch.float32,
                np.dtype(bool).str: torch.bool}


def _filler_batch(fields: dict[str, FieldSpec], hidden_layers: list[int]) -> Batch:
    """One row, one padding token, nothing to learn: keeps a rank with no data in DDP's lock-step. It has
    the cache's k, sample slots and hidden layers, so every loss path (RS-KD, hidden alignment) runs on it."""
    z = torch.zeros(1, 1, dtype=torch.int64)
    k = top_k_of(fields)
    s_n = fields["sample_ids"].shape[0] if "sample_ids" in fields else 0
    return Batch(input_ids=z, position_ids=z.clone(), labels=torch.full((1, 1), IGNORE), kd_mask=torch.zeros(1, 1, dtype=torch.bool),
                 topk_ids=torch.zeros(1, 1, k, dtype=torch.int64), topk_logprobs=torch.zeros(1, 1, k),
                 tail_logmass=torch.full((1, 1), -float("inf")), target_logprob=torch.zeros(1, 1),
                 sample_ids=torch.full((1, 1, s_n), -1, dtype=torch.int64) if s_n else None,
                 sample_counts=torch.zeros(1, 1, s_n) if s_n else None,
                 hidden={layer: torch.zeros(1, 1, fields[f"hidden/{layer}"].shape[0]) for layer in hidden_layers},
                 doc_index=torch.full((1,), -1), num_tokens=0,
                 byte_offsets=torch.full((1, 1, 2), -1) if "byte_offsets" in fields else None)


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


@dataclass
class ResumeState:
    seed: int
    epoch: int
    step: int  # batches this rank consumed in the epoch
    batch_size: int
    world: int
    shuffle_blocks: int
    cache_id: str

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


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
        now = self.state(state.get("epoch", 0), state.get("step", 0)).to_dict()
        for key in ("seed", "batch_size", "world", "shuffle_blocks", "cache_id"):
            if state.get(key) != now[key]:
                raise LoaderError(f"resume state: {key} was {state.get(key)!r} when the checkpoint was written, "
                                  f"now {now[key]!r}; resuming would not continue the same data order")
        return ResumeState(**{k: state[k] for k in now})

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
        from torchdata.nodes import IterableWrapper, Loader, ParallelMapper, PinMemory, Prefetcher, Unbatcher

        s = self.settings
        node = IterableWrapper(self.tasks(epoch, start_step))
        watch = None
        if s.num_workers > 0:
            node = watch = WatchedMapper(ParallelMapper(node, map_fn=_read_and_skip, num_workers=s.num_workers,
                                                        in_order=True, method="process", multiprocessing_context="spawn"),
                                         self.url)
        else:
            node = ParallelMapper(node, map_fn=_read_and_skip, num_workers=0, in_order=True)
        node = Unbatcher(node)
        if s.pin_memory and torch.cuda.is_available():
            node = PinMemory(node)
        node = Prefetcher(node, prefetch_factor=max(1, s.prefetch))
        return _plain_errors(iter(Loader(node, restart_on_stop_iteration=False)), watch)


def _plain_errors(batches: Iterator[Batch], watch: "WatchedMapper | None") -> Iterator[Batch]:
    """The batches, but a dead worker surfaces as the watch's one-line LoaderError: torchdata's prefetch
    thread re-raises it wrapped in a multi-line traceback text."""
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


def _read_and_skip(item: tuple[WindowTask, int]) -> PackedBatches:
    import multiprocessing

    task, skip = item
    in_worker = multiprocessing.parent_process() is not None
    if in_worker:
        _keep_freed_memory()
    return read_window(dataclasses.replace(task, batches=task.batches[skip:]), in_worker=in_worker)


_MALLOC_TUNED = False


def _keep_freed_memory() -> None:
    """Make glibc's malloc in this worker process keep freed memory for reuse instead of returning it.

    A window's decoded arrays (megabytes each) are freed once it is collated; by default glibc hands blocks
    that large back to the kernel (mmap threshold, heap trimming), so the next window faults in and zeroes
    every page again: a quarter of a worker's time went to the kernel's page-fault path (perf). With these
    settings (given as GLIBC_TUNABLES to an in-process loop over the same windows) page faults fell 640k ->
    50k and time 1.95 -> 1.38 s per million tokens of a Zarr cache, 1.59 -> 0.85 of a Parquet one. Only
    worker processes, which hold nothing but windows, are changed; the trainer's allocator is left alone. A
    no-op where the C library has no mallopt (not glibc)."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    import ctypes

    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc malloc.h
        mallopt(m_mmap_threshold, 1 << 30)  # blocks up to 1 GiB from the heap (glibc's own limit is 32 MiB)
        mallopt(m_trim_threshold, (1 << 31) - 1)  # and freed heap kept (a C int: a worker's peak is a few windows)


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
        import multiprocessing
        from concurrent.futures import ThreadPoolExecutor

        super().reset(initial_state)
        # The mapper starts its worker processes inside reset: they are the children that appear during it.
        before = set(multiprocessing.active_children())
        self.mapper.reset(initial_state)
        self._workers = [p for p in multiprocessing.active_children() if p not in before]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-loader-watch")

    def next(self):
        from concurrent.futures import TimeoutError as FutureTimeout

        future = self._pool.submit(self.mapper.next)
        while True:
            try:
                return future.result(timeout=self.poll_s)
            except FutureTimeout:
                pass
            dead = [p for p in self._workers if p.exitcode not in (None, 0)]
            if dead:
                self._stop()
                p = dead[0]
                self.error = (f"{self.url}: loader worker process {p.pid} died with exit code {p.exitcode} "
                              f"({_exit_reason(p.exitcode)}); the windows it held are lost, so the epoch cannot go on")
                raise LoaderError(self.error)

    def get_state(self) -> dict:
        return self.mapper.state_dict()

    def _stop(self) -> None:
        """Stop the other workers and the mapper's threads (the helper thread's `next` then ends)."""
        for p in self._workers:
            if p.exitcode is None:
                p.kill()
        # torchdata has no public close(); its iterator's _shutdown sets the stop events its loops check.
        it = getattr(getattr(self.mapper, "_it", None), "_it", None)
        if hasattr(it, "_shutdown"):
            it._shutdown()
        self._pool.shutdown(wait=False)
        self._pool = None


def _exit_reason(code: int) -> str:
    import signal

    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" + ("; out of memory?" if -code == signal.SIGKILL else "")
    return "exited"
