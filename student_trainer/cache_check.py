"""Checks that a cache and a student fit a run (train or eval), made before anything heavy is loaded or trained."""

from __future__ import annotations

from torch import nn

from formats.reader import Cache, open_cache
from formats.verify import verify_cache
from student_trainer.collate import targets
from student_trainer.errors import TrainError


def open_checked_cache(url: str, split: str, *, verify: bool, require_complete: bool = True,
                       all_splits: bool = False, purpose: str = "train on") -> Cache:
    """The cache at `url`, opened for training or eval: refused, naming the shard, when its structure does not match
    the manifest (`split` only, or every split), when `verify` finds a bad checksum or value, or when `split` has
    no shards or no position to `purpose` (a loss or a metric over zero positions would read as perfect)."""
    cache = open_cache(url, require_complete=require_complete)
    cache.check_structure(None if all_splits else split)
    if verify:
        problems = verify_cache(url)
        if problems:
            raise TrainError(f"{url}: verify found {len(problems)} problem(s), first: {problems[0]}")
    check_split(cache, split, purpose)
    return cache


def check_split(cache: Cache, split: str, purpose: str) -> None:
    """Refuse a split with no shards, or with no position to `purpose` ("train on", "evaluate")."""
    if not cache.shards(split):
        raise TrainError(f"{cache.url}: no shards in split {split!r} (splits: {', '.join(cache.manifest.splits())})")
    if not has_targets(cache, split):
        raise TrainError(f"{cache.url}: no positions to {purpose} in split {split!r}: no token has a next token to "
                         "predict (every sequence is one token long, or the loss mask covers no predicted token)")


def has_targets(cache: Cache, split: str) -> bool:
    """Whether any sequence of `split` has a next-token target (collate.targets). Reads until the first one: one read
    block of a usual cache; every block only of a split that has none. A split of one-token sequences is known
    from the manifest alone."""
    shards = cache.shards(split)
    if sum(s.tokens for s in shards) <= sum(s.sequences for s in shards):
        return False
    for entry in shards:
        shard = cache.open_shard(entry)
        for start, stop in shard.block_ranges():
            block = shard.read_range(start, stop)
            if any(targets(block.get(j)).any() for j in range(stop - start)):
                return True
    return False


def check_output_rows(model: nn.Module, vocab_size: int, who: str) -> None:
    """The cache's ids index the student's logits: it needs at least `vocab_size` output rows."""
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < vocab_size:
        raise TrainError(f"{who} has {rows} output rows, fewer than the cache's vocabulary ({vocab_size})")
