"""Checks that a cache and a student fit a run (train or eval), made before anything heavy is loaded or trained."""

from __future__ import annotations

from torch import nn

from formats.reader import Cache, open_cache
from formats.verify import verify_cache
from student_trainer.errors import TrainError


def open_checked_cache(url: str, split: str, *, verify: bool, require_complete: bool = True,
                       all_splits: bool = False) -> Cache:
    """The cache at `url`, opened for training or eval: refused, naming the shard, when its structure does not match
    the manifest (`split` only, or every split), when `verify` finds a bad checksum or value, or when `split` has
    no shards."""
    cache = open_cache(url, require_complete=require_complete)
    cache.check_structure(None if all_splits else split)
    if verify:
        problems = verify_cache(url)
        if problems:
            raise TrainError(f"{url}: verify found {len(problems)} problem(s), first: {problems[0]}")
    if not cache.shards(split):
        raise TrainError(f"{url}: no shards in split {split!r} (splits: {', '.join(cache.manifest.splits())})")
    return cache


def check_output_rows(model: nn.Module, vocab_size: int, who: str) -> None:
    """The cache's ids index the student's logits: it needs at least `vocab_size` output rows."""
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < vocab_size:
        raise TrainError(f"{who} has {rows} output rows, fewer than the cache's vocabulary ({vocab_size})")
