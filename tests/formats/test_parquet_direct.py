"""The Parquet shard reader's direct page path (fixed-width token columns read page by page, bypassing
Arrow's level decoding) returns exactly what Arrow returns, and leaves anything else to Arrow."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from formats import shard_parquet
from formats.errors import CacheError
from formats.schema import SeqBlock
from tests.formats.synth import VOCAB, make_sequences, rich_fields, same_bytes


def both_ways(path, fields):
    direct = shard_parquet.ParquetShard(str(path), fields, str(path))
    arrow = shard_parquet.ParquetShard(str(path), fields, str(path))
    arrow.direct = {}
    return direct, arrow


@pytest.mark.parametrize("compression", ["zstd", "none"])
@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_direct_reads_equal_arrow_reads_for_every_range(tmp_path, monkeypatch, compression, dtype):
    monkeypatch.setattr(shard_parquet, "ROW_GROUP_TOKENS", 12)  # several row groups
    fields = rich_fields(8, dtype)
    block = SeqBlock.from_sequences(make_sequences([5, 9, 1, 13, 4, 8], fields, VOCAB), fields)
    path = tmp_path / "s.parquet"
    shard_parquet.write(path, block, fields, compression=compression)
    direct, arrow = both_ways(path, fields)
    assert {"topk_ids", "topk_logprobs", "byte_offsets", "hidden/2", "hidden/5"} <= set(direct.direct)
    assert not {"sample_ids", "sample_counts"} & set(direct.direct)  # stored without padding: Arrow reads them
    for start in range(len(block)):
        for stop in range(start + 1, len(block) + 1):
            got, want = direct.read_range(start, stop), arrow.read_range(start, stop)
            assert list(got.token) == list(want.token)
            for name in want.token:
                assert same_bytes(got.token[name], want.token[name]), (name, start, stop)
                assert same_bytes(got.token[name], block.slice(start, stop).token[name]), (name, start, stop)


def test_data_pages_v2_are_left_to_arrow_and_read_the_same(tmp_path):
    fields = rich_fields(8)
    block = SeqBlock.from_sequences(make_sequences([5, 9, 3], fields, VOCAB), fields)
    path = tmp_path / "v2.parquet"
    table = pq.read_table(_written(tmp_path, block, fields))
    pq.write_table(table, path, compression="zstd", use_dictionary=False, data_page_version="2.0")
    direct, _ = both_ways(path, fields)
    got = direct.read_all()
    for name in block.token:
        assert same_bytes(got.token[name], block.token[name]), name


def test_a_damaged_page_is_still_reported_by_arrow(tmp_path):
    fields = rich_fields(8)
    block = SeqBlock.from_sequences(make_sequences([40, 30], fields, VOCAB), fields)
    path = _written(tmp_path, block, fields)
    meta = pq.ParquetFile(str(path)).metadata
    col = [c for c in range(meta.num_columns) if meta.schema.column(c).path.startswith("topk_ids")][0]
    chunk = meta.row_group(0).column(col)
    raw = bytearray(path.read_bytes())
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2
    raw[middle : middle + 16] = b"\xff" * 16
    path.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="row group 0 is unreadable"):
        shard_parquet.ParquetShard(str(path), fields, str(path)).read_all()


def _written(tmp_path, block, fields):
    path = tmp_path / "w.parquet"
    shard_parquet.write(path, block, fields)
    return path


def test_a_version_1_0_shard_with_padded_sample_slots_reads_the_same(tmp_path, monkeypatch):
    fields = rich_fields(8, "F16")
    block = SeqBlock.from_sequences(make_sequences([5, 9, 1, 13], fields, VOCAB), fields)
    with monkeypatch.context() as m:
        m.setattr(shard_parquet, "RAGGED", {})  # the 1.0 writer: fixed [S] slots, padding stored
        shard_parquet.write(tmp_path / "v10.parquet", block, fields)
    assert pq.read_schema(tmp_path / "v10.parquet").field("sample_ids").type == pa.list_(pa.list_(pa.int32(), 4))
    direct, arrow = both_ways(tmp_path / "v10.parquet", fields)
    assert {"sample_ids", "sample_counts"} <= set(direct.direct)
    for reader in (direct, arrow):
        got = reader.read_all()
        for name in block.token:
            assert same_bytes(got.token[name], block.token[name]), name
