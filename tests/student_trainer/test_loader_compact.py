"""A cache with a compact top-k (format 1.2) trains through the loader: its batches are those of the same cache
converted back to a plain float32 top-k, but for the tail (and target) into which that conversion moves the mass
the codes leave out."""

from __future__ import annotations

import torch

from formats.convert import convert_cache
from formats.reader import open_cache
from student_trainer.loader import EpochReader, LoaderSettings
from tests.student_trainer.sequences import same_batch


def test_a_compact_cache_gives_the_batches_of_its_plain_twin(tiny_cache, tmp_path):
    compact = tmp_path / "compact"
    convert_cache(tiny_cache, "zarr", compact, topk_encoding="compact")
    plain = tmp_path / "plain"
    convert_cache(compact, "parquet", plain, topk_encoding="plain")
    assert open_cache(compact).manifest.fields["topk_ids"].encoding is not None
    settings = LoaderSettings(batch_size=2, shuffle_blocks=2, num_workers=1)
    got = list(EpochReader(str(compact), "train", settings, hidden_layers=[1]).batches(epoch=0))
    want = list(EpochReader(str(plain), "train", settings, hidden_layers=[1]).batches(epoch=0))
    assert len(got) == len(want) > 1
    for a, b in zip(got, want):
        assert (a.tail_logmass <= b.tail_logmass).all()
        a.tail_logmass, a.target_logprob = b.tail_logmass, b.target_logprob
        assert same_batch(a, b)
    assert got[0].topk_logprobs.dtype == torch.float32 and got[0].topk_ids.dtype == torch.int64
