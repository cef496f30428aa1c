"""What is written is what is read: both backends, every field and dtype, through every read path
(SPEC.md, Backends; formats/reader.py)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formats.errors import CacheError
from formats.reader import open_cache
from formats.schema import (
    COUNT_DTYPES,
    HIDDEN_DTYPES,
    LOGPROB_DTYPES,
    SeqBlock,
    content_sha256,
    make_fields,
)
from formats.shard_parquet import ParquetShard, leaf_paths
from formats.verify import verify_cache
from formats.writer import CacheWriter
from tests.formats.synth import (
    BACKENDS,
    make_manifest,
    make_sequences,
    random_sequence,
    rich_fields,
    same_bytes,
    write_cache,
)


@st.composite
def cache_plans(draw) -> dict:
    """A cache to write: backend, field options, and (split, length) of every sequence in adding order."""
    slots = draw(st.sampled_from([0, 1, 5]))
    k = draw(st.sampled_from([1, 8, 64] + ([0] if slots else [])))  # 0: samples only
    count_dtype = draw(st.sampled_from(COUNT_DTYPES))
    max_draws = 255 if count_dtype == "U8" else 400
    lengths = draw(st.lists(st.integers(1, 40), max_size=12))
    return {
        "backend": draw(st.sampled_from(BACKENDS)),
        "vocab": draw(st.integers(max(64, k), 300)),
        "options": {
            "top_k": k,
            "logprob_dtype": draw(st.sampled_from(LOGPROB_DTYPES)),
            "sample_slots": slots,
            "count_dtype": count_dtype,
            "hidden": draw(st.dictionaries(st.integers(0, 40), st.tuples(st.integers(1, 12), st.sampled_from(HIDDEN_DTYPES)),
                                           max_size=2)),
            "loss_mask": draw(st.booleans()),
            "position_ids": draw(st.booleans()),
            "byte_offsets": draw(st.booleans()),
        },
        "draws": draw(st.integers(max(1, slots), max_draws)) if slots else 0,
        "items": [(draw(st.sampled_from(["train", "heldout"])), n) for n in lengths],
        # at most about 4 shards per split, so Zarr examples stay fast
        "shard_tokens": max(draw(st.integers(1, 60)), sum(lengths) // 4),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def _expected_shards(items: list[tuple[str, dict]], shard_tokens: int) -> dict[str, list[list[dict]]]:
    """The writer's cut rule, restated: a split's shard closes once it holds >= shard_tokens tokens."""
    out: dict[str, list[list[dict]]] = {}
    open_: dict[str, list[dict]] = {}
    for split, seq in items:
        open_.setdefault(split, []).append(seq)
        if sum(len(s["input_ids"]) for s in open_[split]) >= shard_tokens:
            out.setdefault(split, []).append(open_.pop(split))
    for split, seqs in open_.items():
        out.setdefault(split, []).append(seqs)
    return out


def _assert_block_equals(got: SeqBlock, want: SeqBlock, fields) -> None:
    assert got.offsets.tolist() == want.offsets.tolist()
    for name, spec in fields.items():
        g = (got.token if spec.per == "token" else got.sequence)[name]
        w = (want.token if spec.per == "token" else want.sequence)[name]
        assert same_bytes(g, w), name


def _assert_sequence_equals(got: dict, want: dict, fields) -> None:
    assert set(got) == set(fields)
    for name, spec in fields.items():
        assert same_bytes(np.asarray(got[name]), np.asarray(want[name], dtype=spec.np_dtype)), name


def _check_cache(root: Path, plan: dict, fields, items: list[tuple[str, dict]]) -> None:
    cache = open_cache(root, require_complete=True)
    m = cache.manifest
    expected = _expected_shards(items, plan["shard_tokens"])
    assert {split: [len(g) for g in groups] for split, groups in expected.items()} == \
        {split: [s.sequences for s in m.shards if s.split == split] for split in m.splits()}
    for split, groups in expected.items():
        for entry, group in zip(cache.shards(split), groups):
            want = SeqBlock.from_sequences(group, fields)
            assert entry.content_sha256 == content_sha256(want, fields)
            assert entry.tokens == want.num_tokens
            _assert_block_equals(cache.read_shard(entry), want, fields)
        every = SeqBlock.from_sequences([s for g in groups for s in g], fields)
        _assert_block_equals(SeqBlock.concat(list(cache.iter_blocks(split)), fields), every, fields)
        seqs = [s for g in groups for s in g]
        for i in sorted({0, len(seqs) // 2, len(seqs) - 1}):
            _assert_sequence_equals(cache.sequence(i, split), seqs[i], fields)
    assert sum(len(b) for b in cache.iter_blocks()) == len(items) == m.totals()["sequences"]
    assert verify_cache(str(root)) == []


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=cache_plans())
def test_every_array_written_is_read_back_bit_for_bit(plan):
    fields = make_fields(**plan["options"])
    rng = np.random.default_rng(plan["seed"])
    items = [(split, random_sequence(rng, n, fields, plan["vocab"], plan["draws"], j))
             for j, (split, n) in enumerate(plan["items"])]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cache"
        write_cache(root, plan["backend"], items, fields, vocab=plan["vocab"], draws=plan["draws"],
                    shard_tokens=plan["shard_tokens"])
        _check_cache(root, plan, fields, items)


def test_an_empty_cache_round_trips_with_no_shards(tmp_path, backend):
    fields = rich_fields()
    m = write_cache(tmp_path / "c", backend, [], fields)
    assert m.shards == [] and m.complete
    cache = open_cache(tmp_path / "c", require_complete=True)
    assert list(cache.iter_blocks()) == [] and cache.num_sequences() == 0
    with pytest.raises(IndexError):
        cache.sequence(0)
    assert verify_cache(str(tmp_path / "c")) == []


def test_a_shard_holding_zero_sequences_round_trips(tmp_path, backend):
    fields = rich_fields()
    empty = SeqBlock.from_sequences([], fields)
    with CacheWriter(tmp_path / "c", make_manifest(backend, fields, 64, 16), 10) as w:
        w.write_shard("train", empty)
        w.finish()
    cache = open_cache(tmp_path / "c")
    (entry,) = cache.shards()
    assert entry.sequences == 0 and entry.tokens == 0
    _assert_block_equals(cache.read_shard(entry), empty, fields)
    assert sum(len(b) for b in cache.iter_blocks()) == 0
    assert verify_cache(str(tmp_path / "c")) == []


def test_random_access_counts_sequences_across_shards_of_one_split(small_cache):
    cache = open_cache(small_cache.root)
    train = [s for split, s in small_cache.items if split == "train"]
    assert cache.num_sequences("train") == 4 and cache.num_sequences() == 5
    for i, seq in enumerate(train):  # sequences 2 and 3 live in the second train shard
        _assert_sequence_equals(cache.sequence(i, "train"), seq, small_cache.fields)
    _assert_sequence_equals(cache.sequence(4), small_cache.items[4][1], small_cache.fields)
    _assert_sequence_equals(cache.sequence(0, "heldout"), small_cache.items[4][1], small_cache.fields)
    for bad in (-1, 4):
        with pytest.raises(IndexError, match=f"sequence {bad} out of range"):
            cache.sequence(bad, "train")


def test_iter_blocks_of_a_split_yields_only_that_split_in_manifest_order(small_cache):
    cache = open_cache(small_cache.root)
    docs = [int(d) for b in cache.iter_blocks("train") for d in b.sequence["doc_index"]]
    assert docs == [0, 1, 2, 3]
    assert [int(d) for b in cache.iter_blocks("heldout") for d in b.sequence["doc_index"]] == [4]
    assert [int(d) for b in cache.iter_blocks() for d in b.sequence["doc_index"]] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_shards_stream_in_several_blocks_that_join_to_the_whole(tmp_path, backend, monkeypatch):
    from formats import shard_parquet, shard_zarr

    monkeypatch.setattr(shard_parquet, "ROW_GROUP_TOKENS", 30)  # row groups / inner chunks of a few sequences
    monkeypatch.setattr(shard_zarr, "CHUNK_TOKENS", 16)
    fields = make_fields(8, logprob_dtype="F16", loss_mask=True)
    seqs = make_sequences([13, 9, 20, 1, 17, 8, 11], fields)
    write_cache(tmp_path / "c", backend, [("train", s) for s in seqs], fields, shard_tokens=10**6)
    cache = open_cache(tmp_path / "c")
    (entry,) = cache.shards()
    shard = cache.open_shard(entry)
    blocks = list(shard.iter_blocks()) if backend == "parquet" else list(shard.iter_blocks(block_tokens=30))
    assert len(blocks) > 2
    want = SeqBlock.from_sequences(seqs, fields)
    _assert_block_equals(SeqBlock.concat(blocks, fields), want, fields)
    _assert_block_equals(shard.read_range(2, 5), want.slice(2, 5), fields)
    assert verify_cache(str(tmp_path / "c")) == []


def test_a_parquet_shard_is_a_plain_table_with_one_row_per_sequence(tmp_path):
    fields = make_fields(4, logprob_dtype="F16", sample_slots=2, count_dtype="U16", hidden={7: (3, "BF16")},
                         byte_offsets=True)
    seqs = make_sequences([5, 3], fields, draws=300)
    write_cache(tmp_path / "c", "parquet", [("train", s) for s in seqs], fields, draws=300, shard_tokens=100)
    path = tmp_path / "c" / "shards" / "train-00000.parquet"
    table = pq.read_table(path)
    assert table.num_rows == 2
    schema = table.schema
    assert schema.field("input_ids").type == pa.list_(pa.int32())
    assert schema.field("topk_ids").type == pa.list_(pa.list_(pa.int32(), 4))
    assert schema.field("topk_logprobs").type == pa.list_(pa.list_(pa.float16(), 4))
    # RS-KD samples: one list per token holding only the drawn entries (the padding slots are not stored)
    assert schema.field("sample_counts").type == pa.list_(pa.list_(pa.uint16()))
    assert schema.field("sample_ids").type == pa.list_(pa.list_(pa.int32()))
    drawn = seqs[1]["sample_counts"] > 0
    assert table.column("sample_ids").to_pylist()[1] == [row[d].tolist() for row, d in zip(seqs[1]["sample_ids"], drawn)]
    assert schema.field("hidden/7").type == pa.list_(pa.list_(pa.uint16(), 3))
    assert schema.field("byte_offsets").type == pa.list_(pa.list_(pa.int32(), 2))
    assert schema.field("doc_index").type == pa.int64()
    assert all(table.column(n).null_count == 0 for n in table.column_names)
    assert table.column("input_ids").to_pylist()[1] == seqs[1]["input_ids"].tolist()
    meta = schema.metadata
    assert meta[b"kdcache.format"] == b"kdcache" and meta[b"kdcache.format_version"] == b"1.2.0"
    assert json.loads(meta[b"kdcache.fields"]) == {n: s.to_json() for n, s in fields.items()}
    column = pq.ParquetFile(path).metadata.row_group(0).column(0)
    assert column.compression == "ZSTD"
    assert not any("DICTIONARY" in e for e in column.encodings)
    counts = pq.ParquetFile(path).metadata.row_group(0).column(table.column_names.index("sample_counts"))
    assert "BYTE_STREAM_SPLIT" in counts.encodings
    # the writer's per-column zstd levels and encodings are keyed by these paths: they must name every column
    meta = pq.ParquetFile(path).metadata
    assert sorted(leaf_paths(fields).values()) == sorted(meta.schema.column(i).path for i in range(meta.num_columns))


def test_a_zarr_shard_is_a_flat_token_axis_with_seq_offsets(tmp_path):
    import zarr

    fields = make_fields(4, logprob_dtype="BF16", hidden={7: (3, "F16")}, position_ids=True)
    seqs = make_sequences([5, 3], fields)
    write_cache(tmp_path / "c", "zarr", [("train", s) for s in seqs], fields, shard_tokens=100)
    g = zarr.open_group(str(tmp_path / "c" / "shards" / "train-00000.zarr"), mode="r", zarr_format=3)
    assert g["seq_offsets"][:].tolist() == [0, 5, 8] and g["seq_offsets"].dtype == np.int64
    assert g["topk_ids"].shape == (8, 4)
    assert g["topk_logprobs"].dtype == np.uint16 and g["topk_logprobs"].attrs["kdcache_dtype"] == "BF16"
    assert g["hidden"]["7"].shape == (8, 3) and g["hidden"]["7"].dtype == np.float16
    assert g["doc_index"][:].tolist() == [0, 1]
    assert g["input_ids"][5:8].tolist() == seqs[1]["input_ids"].tolist()
    assert g.attrs["kdcache.format"] == "kdcache" and g.attrs["kdcache.format_version"] == "1.2.0"
    assert g.attrs["kdcache.fields"] == {n: s.to_json() for n, s in fields.items()}
    codecs = g["input_ids"].metadata.to_dict()["codecs"]
    assert codecs[0]["name"] == "sharding_indexed"
    assert any(c["name"] == "zstd" for c in codecs[0]["configuration"]["codecs"])


@pytest.mark.parametrize("change, message", [
    (lambda ids, counts: ([[row + [7] * 3 for row in seq] for seq in ids], counts), "more than the 2 slots"),
    (lambda ids, counts: ([[row[:1] for row in seq] for seq in ids], counts), "different numbers of samples per token"),
], ids=["more_samples_than_slots", "ids_and_counts_disagree"])
def test_a_crafted_sample_column_is_refused_naming_the_shard(tmp_path, change, message):
    fields = make_fields(4, sample_slots=2, count_dtype="U8")
    seqs = make_sequences([5, 3], fields, draws=9)
    write_cache(tmp_path / "c", "parquet", [("train", s) for s in seqs], fields, draws=9, shard_tokens=100)
    path = tmp_path / "c" / "shards" / "train-00000.parquet"
    table = pq.read_table(path)
    ids, counts = change(table.column("sample_ids").to_pylist(), table.column("sample_counts").to_pylist())
    i = table.column_names.index("sample_ids")
    table = table.set_column(i, "sample_ids", pa.array(ids, table.schema.field("sample_ids").type))
    pq.write_table(table, tmp_path / "crafted.parquet")
    with pytest.raises(CacheError, match=message):
        ParquetShard(str(tmp_path / "crafted.parquet"), fields, "crafted.parquet").read_all()
