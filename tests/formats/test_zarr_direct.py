"""The Zarr shard reader's direct path (shard index + zstd per inner chunk, bypassing zarr-python) returns
exactly what zarr-python returns, over chunk boundaries and partial chunks, and refuses a damaged index."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from formats import shard_zarr
from formats.errors import CacheError
from formats.schema import SeqBlock
from tests.formats.synth import VOCAB, make_sequences, rich_fields, same_bytes


def open_shard(path, fields, block):
    return shard_zarr.ZarrShard(zarr.storage.LocalStore(str(path), read_only=True), fields, str(path),
                                block.num_tokens, len(block))


@pytest.fixture()
def written(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_zarr, "CHUNK_TOKENS", 7)  # many small inner chunks, most reads cross a boundary
    fields = rich_fields(8, "BF16")
    block = SeqBlock.from_sequences(make_sequences([5, 9, 1, 13, 4, 8], fields, VOCAB), fields)
    path = tmp_path / "s.zarr"
    shard_zarr.write(path, block, fields)
    return path, fields, block


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_direct_reads_equal_zarr_reads_for_every_range(tmp_path, compression):
    fields = rich_fields(8)
    block = SeqBlock.from_sequences(make_sequences([5, 9, 1, 13, 4, 8], fields, VOCAB), fields)
    path = tmp_path / "s.zarr"
    shard_zarr.write(path, block, fields, compression=compression)
    shard = open_shard(path, fields, block)
    assert set(shard.direct) == set(shard.arrays), "the writer's own layout should be read directly"
    for start in range(len(block)):
        for stop in range(start, len(block) + 1):
            got = shard.read_range(start, stop)
            want = block.slice(start, stop)
            for name in want.token:
                assert same_bytes(got.token[name], want.token[name]), (name, start, stop)
            for name in want.sequence:
                assert same_bytes(got.sequence[name], want.sequence[name]), (name, start, stop)


def test_direct_reads_cross_small_inner_chunks_like_zarr(written):
    path, fields, block = written
    shard = open_shard(path, fields, block)
    assert shard.direct
    for name, arr in shard.arrays.items():
        total = arr.shape[0]
        for lo, hi in [(0, total), (3, 11), (6, 8), (7, 14), (total - 1, total), (2, 2)]:
            hi = min(hi, total)
            assert same_bytes(shard.direct[name].read(lo, hi), np.asarray(arr[lo:hi])), (name, lo, hi)


def test_a_damaged_shard_index_is_refused_with_the_array_named(written):
    path, fields, block = written
    data_file = path / "topk_ids" / "c" / "0" / "0"
    raw = bytearray(data_file.read_bytes())
    raw[-10] ^= 0xFF  # inside the index: its crc32c no longer matches
    data_file.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="array 'topk_ids' is unreadable.*checksum"):
        open_shard(path, fields, block).read_all()


def test_read_blocks_do_not_depend_on_the_inner_chunks_a_shard_was_written_with(tmp_path, monkeypatch):
    # The loader's epoch order is built from block_ranges: caches written with other chunk sizes (older
    # writers used 16384-row chunks) must give the same blocks.
    fields = rich_fields(8)
    block = SeqBlock.from_sequences(make_sequences([5, 9, 1, 13, 4, 8, 11, 3], fields, VOCAB), fields)
    ranges = []
    for rows in (3, 16384):
        monkeypatch.setattr(shard_zarr, "CHUNK_TOKENS", rows)
        shard_zarr.write(tmp_path / f"c{rows}.zarr", block, fields)
        shard = open_shard(tmp_path / f"c{rows}.zarr", fields, block)
        ranges.append(shard.block_ranges(20))
        assert zarr.open_array(zarr.storage.LocalStore(str(tmp_path / f"c{rows}.zarr")), path="input_ids").chunks == (min(rows, 54),)
    assert ranges[0] == ranges[1] and len(ranges[0]) > 2
