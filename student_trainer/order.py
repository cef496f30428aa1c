"""The order of an epoch: which sequences each rank reads, in which batches, and the resume state that recomputes it.

The order is a pure function of (seed, epoch, the split's read blocks, batch size, world size): blocks
(Parquet row groups / Zarr token blocks) are permuted, taken `shuffle_blocks` at a time as a shuffle window,
and the window's sequences are permuted and cut into global batches of `batch_size * world` sequences, each
split across ranks. Every sequence of the split is delivered once per epoch, to one rank. A window never
shares a batch with the next, so its last global batch may be short (a rank may then get an empty batch,
which collates to one fully masked row so DDP still steps).

The resume state is the smallest set of primitives that recomputes everything: {seed, epoch, step within
the epoch, batch size, world, shuffle window, cache id}; on resume it is checked against the current
settings, naming the field that differs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

import numpy as np

from formats.reader import Cache
from student_trainer.errors import LoaderError


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


# What fixes the order; epoch and step only say where in it a run stopped.
ORDER_KEYS = ("seed", "batch_size", "world", "shuffle_blocks", "cache_id")


def check_resume(saved: dict, now: ResumeState) -> ResumeState:
    """The saved state, refused when it does not fit the current one (`now`), naming the field and both values."""
    current = now.to_dict()
    for key in ORDER_KEYS:
        if saved.get(key) != current[key]:
            raise LoaderError(f"resume state: {key} was {saved.get(key)!r} when the checkpoint was written, "
                              f"now {current[key]!r}; resuming would not continue the same data order")
    return ResumeState(**{k: saved[k] for k in current})
