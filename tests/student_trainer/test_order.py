"""student_trainer.order alone, without a cache: epoch windows and rank slices are pure functions of their
arguments, and a resume state is refused when it would not continue the same order."""

from __future__ import annotations

from collections import Counter

import pytest

from student_trainer.errors import LoaderError
from student_trainer.order import Block, ResumeState, check_resume, epoch_windows, rank_slice

BLOCKS = [Block(shard, start, stop) for shard, (start, stop) in enumerate([(0, 3), (0, 5), (2, 4), (0, 1), (1, 7)])]
SEQUENCES = Counter((b, j) for b, block in enumerate(BLOCKS) for j in range(block.stop - block.start))


def test_an_epoch_s_windows_hold_every_sequence_once_in_batches_of_at_most_the_global_batch():
    windows = epoch_windows(BLOCKS, seed=3, epoch=1, window=2, global_batch=4)
    assert len(windows) == 3  # five blocks, two per window
    batches = [batch for w in windows for batch in w]
    assert all(1 <= len(batch) <= 4 for batch in batches)
    assert Counter(item for batch in batches for item in batch) == SEQUENCES


def test_the_same_seed_and_epoch_give_the_same_windows_and_another_epoch_or_seed_others():
    first = epoch_windows(BLOCKS, seed=3, epoch=1, window=2, global_batch=4)
    assert epoch_windows(BLOCKS, seed=3, epoch=1, window=2, global_batch=4) == first
    assert epoch_windows(BLOCKS, seed=3, epoch=2, window=2, global_batch=4) != first
    assert epoch_windows(BLOCKS, seed=4, epoch=1, window=2, global_batch=4) != first


@pytest.mark.parametrize("n, world", [(7, 3), (2, 3), (6, 2), (0, 2)])
def test_rank_slices_are_contiguous_cover_the_batch_and_differ_in_size_by_at_most_one(n, world):
    items = list(range(n))
    slices = [rank_slice(items, rank, world) for rank in range(world)]
    assert sum(slices, []) == items
    assert max(map(len, slices)) - min(map(len, slices)) <= 1


def test_check_resume_accepts_a_matching_state_and_names_the_field_that_differs():
    now = ResumeState(seed=0, epoch=0, step=0, batch_size=8, world=2, shuffle_blocks=4, cache_id="abc")
    saved = {**now.to_dict(), "epoch": 3, "step": 17}
    assert check_resume(saved, now) == ResumeState(**saved)
    with pytest.raises(LoaderError, match="shuffle_blocks was 8 when the checkpoint was written, now 4"):
        check_resume({**saved, "shuffle_blocks": 8}, now)
