"""Memory a reader process reuses from window to window: a pool of shared-memory window buffers, and glibc's
malloc told to keep what a window freed.

Both exist for one reason: memory the kernel hands out fresh costs a page fault and a zeroed page per 4 KiB,
which made a worker process twice as slow as the same work in the trainer process (benchmarks/RESULTS.md,
"Loader throughput", "What changed, and why"). A slot is a memfd (shared memory that any process it is
handed to can map) with a header whose byte 0 is 1 while the trainer may still read the window in it and 0
once every tensor of that window is gone. A process keeps up to _MAX_SLOTS slots mapped and collates each
window into a free one, so after the first few windows collation writes pages that are already there.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import tempfile
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch

_HEADER = 64
_MAX_SLOTS = 8
_SLOT_ROUND = 1 << 20


@dataclass
class Slot:
    fd: int
    mapping: mmap.mmap  # header + capacity bytes, mapped for as long as the slot is in the pool
    capacity: int


_SLOTS: list[Slot] = []  # this process's pool, oldest first
_SLOTS_LOCK = threading.Lock()  # two in-process readers (say train and eval) collate on two prefetch threads


def take_slot(n: int) -> Slot:
    """A free slot of this process's pool holding at least n bytes, marked busy: the smallest that fits, else a
    free one grown, else a new one (dropping the oldest slot past _MAX_SLOTS: a busy one dropped stays mapped
    by whoever holds its window, and its memory goes when they let go)."""
    with _SLOTS_LOCK:
        return _take_slot_locked(n)


def _take_slot_locked(n: int) -> Slot:
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
            slot = Slot(fd, mmap.mmap(fd, _HEADER + capacity), capacity)
            _SLOTS.append(slot)
    slot.mapping[0] = 1
    return slot


def _shared_fd() -> int:
    """A descriptor of shared memory that can be handed to another process: a memfd where the OS has them
    (Linux), else an unlinked temporary file (macOS)."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("kdcache-window", os.MFD_CLOEXEC)
    fd, path = tempfile.mkstemp(prefix="kdcache-window-")
    os.unlink(path)
    return fd


def slot_array(slot: Slot, n: int) -> np.ndarray:
    """The slot's first n bytes as a writable uint8 array, for collating into. The caller drops it before the
    slot goes back to the pool (the pool may remap a free slot, which no export of the mapping may outlive)."""
    return np.frombuffer(slot.mapping, np.uint8, count=n, offset=_HEADER)


def lend(slot: Slot, n: int) -> torch.Tensor:
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


def map_sent(fd: int, n: int) -> torch.Tensor:
    """Receiving side of a slot another process sent (its descriptor `fd`): its first n bytes as a uint8 tensor.
    When that tensor's storage is freed the slot's busy byte is cleared through the descriptor, and the sender
    reuses the slot."""
    mapping = mmap.mmap(fd, _HEADER + n)
    if n == 0:
        _release_sent(fd)
        return torch.empty(0, dtype=torch.uint8)
    view = memoryview(mapping)[_HEADER : _HEADER + n]
    weakref.finalize(view, _release_sent, fd)
    return torch.frombuffer(view, dtype=torch.uint8)


def _release_sent(fd: int) -> None:
    os.pwrite(fd, b"\0", 0)
    os.close(fd)


_MALLOC_TUNED = False


def keep_freed_memory() -> None:
    """Make glibc's malloc in this (reader) process keep freed memory for reuse instead of returning it.

    A window's decoded arrays (megabytes each) are freed once it is collated; by default glibc hands blocks
    that large back to the kernel (mmap threshold, heap trimming), so the next window faults in and zeroes
    every page again: a quarter of a worker's time went to the kernel's page-fault path (perf; the figures
    before and after are in benchmarks/RESULTS.md, "Loader throughput"). Only worker processes, which hold
    nothing but windows, call this; the trainer's allocator is left alone. A no-op where the C library has no
    mallopt (not glibc)."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc malloc.h
        mallopt(m_mmap_threshold, 1 << 30)  # blocks up to 1 GiB from the heap (glibc's own limit is 32 MiB)
        mallopt(m_trim_threshold, (1 << 31) - 1)  # and freed heap kept (a C int: a worker's peak is a few windows)
