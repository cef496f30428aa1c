"""Caches with a compact top-k (format 1.2): written by CacheWriter, read the same through every reader path,
verified against the bound, converted both ways, and refused with a clear error when damaged."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from formats import shard_parquet, shard_zarr
from formats.convert import convert_cache
from formats.errors import CacheError
from formats.reader import open_cache
from formats.schema import SeqBlock, from_float32, make_fields, to_float32
from formats.verify import verify_cache
from formats.writer import CacheWriter
from tests.formats.synth import VOCAB, edit_manifest, make_manifest, make_sequences, same_bytes, write_cache


def compact_fields(k: int = 8, bits: int = 4, **kw):
    return make_fields(k, topk_encoding="compact", logprob_bits=bits, vocab_size=VOCAB, **kw)


def rich_compact_fields():
    return compact_fields(sample_slots=4, count_dtype="U8", hidden={2: (8, "F16")}, loss_mask=True, position_ids=True,
                          byte_offsets=True)


def items(fields, lengths=(10, 10, 12, 8, 6), seed=0):
    seqs = make_sequences(list(lengths), fields, seed=seed)
    return [("train", s) for s in seqs[:-1]] + [("heldout", seqs[-1])]


@pytest.fixture
def compact_cache(tmp_path, backend):
    fields = rich_compact_fields()
    its = items(fields)
    write_cache(tmp_path / "c", backend, its, fields)
    return tmp_path / "c", fields, its


def test_the_field_table_names_the_encoding_and_the_writer_needs_float32_and_the_vocabulary():
    fields = compact_fields()
    assert fields["topk_ids"].encoding == fields["topk_logprobs"].encoding is not None
    assert fields["topk_logprobs"].dtype == "F32" and fields["topk_ids"].encoding.rank_bytes == 1
    assert fields["topk_ids"].to_json()["encoding"]["name"] == "compact"
    with pytest.raises(CacheError, match="capture them as F32"):
        make_fields(8, "BF16", topk_encoding="compact", vocab_size=VOCAB)
    with pytest.raises(CacheError, match="vocabulary size"):
        make_fields(8, topk_encoding="compact")
    with pytest.raises(CacheError, match="top-k encoding must be one of"):
        make_fields(8, topk_encoding="zip")
    with pytest.raises(CacheError, match="top_k >= 2"):
        make_fields(1, topk_encoding="compact", vocab_size=VOCAB)


def test_a_compact_cache_keeps_top1_tail_and_every_other_field_of_the_plain_one_exactly(tmp_path, backend):
    plain_fields = make_fields(8, sample_slots=4, count_dtype="U8", hidden={2: (8, "F16")}, loss_mask=True,
                               position_ids=True, byte_offsets=True)
    its = items(plain_fields)
    m = write_cache(tmp_path / "c", backend, its, rich_compact_fields())
    assert m.format_version == "1.2.0" and verify_cache(str(tmp_path / "c")) == []
    got = SeqBlock.concat(list(open_cache(tmp_path / "c").iter_blocks()), m.fields)
    want = SeqBlock.concat([SeqBlock.from_sequences([s for sp, s in its if sp == split], plain_fields)
                            for split in ("train", "heldout")], plain_fields)
    for name in want.token:
        if name not in ("topk_ids", "topk_logprobs"):
            assert same_bytes(got.token[name], want.token[name]), name
    assert same_bytes(got.token["topk_ids"][:, 0], want.token["topk_ids"][:, 0])
    assert same_bytes(got.token["topk_logprobs"][:, 0], want.token["topk_logprobs"][:, 0])
    assert np.array_equal(np.sort(got.token["topk_ids"], 1), np.sort(want.token["topk_ids"], 1))


def test_every_reader_path_returns_the_same_logical_arrays(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_parquet, "ROW_GROUP_TOKENS", 12)  # several row groups: the table sits in the first
    monkeypatch.setattr(shard_zarr, "CHUNK_TOKENS", 7)
    fields = rich_compact_fields()
    block = SeqBlock.from_sequences(make_sequences([5, 9, 1, 13, 4, 8], fields), fields)
    logical = shard_parquet.write(tmp_path / "s.parquet", block, fields)
    assert same_bytes(shard_zarr.write(tmp_path / "s.zarr", block, fields).token["topk_logprobs"],
                      logical.token["topk_logprobs"])
    direct = shard_parquet.ParquetShard(str(tmp_path / "s.parquet"), fields, "p")
    assert {"topk_ids/rank0", "topk_logprobs/codes"} <= set(direct.direct)
    arrow = shard_parquet.ParquetShard(str(tmp_path / "s.parquet"), fields, "p")
    arrow.direct = {}
    z_direct = shard_zarr.ZarrShard(zarr.storage.LocalStore(str(tmp_path / "s.zarr"), read_only=True), fields, "z",
                                    block.num_tokens, len(block))
    assert {"topk_ids/rank0", "topk_ids/table"} <= set(z_direct.direct)
    z_plain = shard_zarr.ZarrShard(zarr.storage.LocalStore(str(tmp_path / "s.zarr"), read_only=True), fields, "z",
                                   block.num_tokens, len(block))
    z_plain.direct = {}
    for start in range(len(block)):
        for stop in range(start + 1, len(block) + 1):
            want = logical.slice(start, stop)
            for reader in (direct, arrow, z_direct, z_plain):
                got = reader.read_range(start, stop)
                assert list(got.token) == list(want.token)
                for name in want.token:
                    assert same_bytes(got.token[name], want.token[name]), (reader, name, start, stop)


def test_every_cache_level_read_agrees_with_the_content_checksum(compact_cache):
    root, fields, its = compact_cache
    cache = open_cache(root)
    cache.check_structure()
    assert verify_cache(str(root)) == []
    first = cache.sequence(0, "train")
    assert same_bytes(first["topk_ids"], cache.read_shard(cache.shards("train")[0]).token["topk_ids"][:10])
    assert first["topk_logprobs"].dtype == np.float32


def _write_block(root, backend, fields, mutate):
    """A cache whose logical top-k `mutate` changed after quantization; on-grid values are written as they are."""
    its = items(fields)
    write_cache(root, backend, its, fields)
    cache = open_cache(root)
    blocks = [(e.split, cache.read_shard(e)) for e in cache.shards()]
    shutil.rmtree(root)

    with CacheWriter(root, make_manifest(backend, fields, VOCAB, 16), 20) as w:
        for split, block in blocks:
            mutate(block)
            w.write_shard(split, block)
        w.finish()


def test_verify_catches_codes_outside_the_bound(tmp_path, backend):
    fields = compact_fields(bits=6)
    cb = fields["topk_ids"].encoding.values

    def lower(block):  # every entry after the top-1 three codes down: on the codebook, valid checksums, bound broken
        lp = block.token["topk_logprobs"]
        lp[:, 1:] = cb[np.maximum(np.searchsorted(cb, lp[:, 1:]) - 3, 0)]

    _write_block(tmp_path / "low", backend, fields, lower)
    problems = verify_cache(str(tmp_path / "low"))
    assert problems and any("quantization bound does not hold" in p for p in problems)

    def lift(block):  # the last entry two codes up (not past its neighbour): more mass than the source held
        lp = block.token["topk_logprobs"]
        lp[:, -1] = cb[np.minimum(np.searchsorted(cb, lp[:, -1]) + 2, np.searchsorted(cb, lp[:, -2]))]

    _write_block(tmp_path / "high", backend, fields, lift)
    assert any("holds more mass than the source" in p for p in verify_cache(str(tmp_path / "high")))


def test_verify_catches_a_top1_that_is_not_strictly_first(tmp_path):
    fields = compact_fields()
    write_cache(tmp_path / "c", "zarr", items(fields), fields)
    arr = zarr.open_array(zarr.storage.LocalStore(str(tmp_path / "c" / "shards" / "train-00000.zarr")),
                          path="topk_logprobs/top1", mode="r+")
    arr[0] = -30.0
    problems = verify_cache(str(tmp_path / "c"), checksums=False)
    assert any("content checksum differs" in p for p in problems)
    assert any("top-1 is not strictly above the other entries (first at token 0)" in p for p in problems)


def test_convert_plain_to_compact_and_back_and_between_backends(tmp_path):
    plain_fields = make_fields(8, sample_slots=4, count_dtype="U8")
    write_cache(tmp_path / "plain", "parquet", items(plain_fields), plain_fields)
    m = convert_cache(tmp_path / "plain", "zarr", tmp_path / "compact", topk_encoding="compact", logprob_bits=5)
    assert m.fields["topk_ids"].encoding.logprob_bits == 5 and m.build["topk_encoding"] == "compact"
    assert m.build["logprob_bits"] == 5 and verify_cache(str(tmp_path / "compact")) == []
    back = convert_cache(tmp_path / "compact", "parquet", tmp_path / "back", topk_encoding="plain")
    assert back.fields["topk_ids"].encoding is None and back.fields["topk_logprobs"].dtype == "F32"
    assert back.build["decoded_from"] == {"topk_encoding": "compact", "logprob_bits": 5}
    assert verify_cache(str(tmp_path / "back")) == []  # a valid plain cache: the left-out mass joined the tail
    again = convert_cache(tmp_path / "compact", "parquet", tmp_path / "again")  # compact stays compact
    assert again.fields["topk_ids"].encoding == m.fields["topk_ids"].encoding
    assert [s.content_sha256 for s in again.shards] == [s.content_sha256 for s in m.shards]
    convert_cache(tmp_path / "back", "zarr", tmp_path / "recompact", topk_encoding="compact", logprob_bits=5)
    assert verify_cache(str(tmp_path / "recompact")) == []
    c, p, r = open_cache(tmp_path / "compact"), open_cache(tmp_path / "back"), open_cache(tmp_path / "recompact")
    for ec, ep, er in zip(c.shards(), p.shards(), r.shards(), strict=True):
        x, y, z = c.read_shard(ec), p.read_shard(ep), r.read_shard(er)
        for name in ("topk_ids", "topk_logprobs"):  # decoded values are on the codebook: they keep their codes
            assert same_bytes(x.token[name], y.token[name]) and same_bytes(x.token[name], z.token[name])
        assert same_bytes(y.token["tail_logmass"], z.token["tail_logmass"])
        assert (y.token["tail_logmass"] >= x.token["tail_logmass"]).all()
        mass = np.exp(y.token["topk_logprobs"].astype(np.float64)).sum(1) + np.exp(y.token["tail_logmass"].astype(np.float64))
        assert np.abs(mass - 1).max() < 1e-5
    a, b = open_cache(tmp_path / "plain"), open_cache(tmp_path / "compact")
    for ea, eb in zip(a.shards(), b.shards()):
        x, y = a.read_shard(ea), b.read_shard(eb)
        assert same_bytes(x.token["tail_logmass"], y.token["tail_logmass"])
        assert same_bytes(x.token["topk_logprobs"][:, 0], y.token["topk_logprobs"][:, 0])
        assert same_bytes(x.token["sample_ids"], y.token["sample_ids"])


def test_a_bf16_cache_converts_to_compact_with_its_rounding_recorded(tmp_path):
    fields = make_fields(8, "BF16")
    write_cache(tmp_path / "bf16", "parquet", items(fields), fields)
    m = convert_cache(tmp_path / "bf16", "parquet", tmp_path / "compact", topk_encoding="compact")
    assert m.fields["topk_ids"].encoding.source_dtype == "BF16" and m.fields["topk_ids"].encoding.logprob_bits == 6
    assert verify_cache(str(tmp_path / "compact")) == []
    src, out = open_cache(tmp_path / "bf16"), open_cache(tmp_path / "compact")
    x, y = src.read_shard(src.shards()[0]), out.read_shard(out.shards()[0])
    assert same_bytes(to_float32(x.token["topk_logprobs"][:, 0], "BF16"), y.token["topk_logprobs"][:, 0])
    assert same_bytes(from_float32(y.token["topk_logprobs"][:, 0], "BF16"), x.token["topk_logprobs"][:, 0])


def test_a_compact_cache_derives_a_smaller_top_k(tmp_path):
    fields = compact_fields(16)
    write_cache(tmp_path / "c", "parquet", items(fields), fields)
    m = convert_cache(tmp_path / "c", "parquet", tmp_path / "k4", top_k=4)
    assert m.top_k == 4 and m.fields["topk_ids"].encoding is not None and verify_cache(str(tmp_path / "k4")) == []
    a, b = open_cache(tmp_path / "c"), open_cache(tmp_path / "k4")
    x, y = a.read_shard(a.shards()[0]), b.read_shard(b.shards()[0])
    assert same_bytes(x.token["topk_ids"][:, :4], y.token["topk_ids"]) and same_bytes(x.token["topk_logprobs"][:, :4],
                                                                                        y.token["topk_logprobs"])
    with pytest.raises(CacheError, match="k >= 2"):
        convert_cache(tmp_path / "c", "parquet", tmp_path / "k1", top_k=1)
    assert convert_cache(tmp_path / "c", "parquet", tmp_path / "k1", top_k=1, topk_encoding="plain").top_k == 1


def test_convert_refuses_encoding_options_that_do_not_apply(tmp_path):
    fields = make_fields(8)
    write_cache(tmp_path / "p", "parquet", items(fields), fields)
    with pytest.raises(CacheError, match="--logprob-bits applies to a compact top-k"):
        convert_cache(tmp_path / "p", "parquet", tmp_path / "x", logprob_bits=5)
    with pytest.raises(CacheError, match="logprob bits must be in"):
        convert_cache(tmp_path / "p", "parquet", tmp_path / "y", topk_encoding="compact", logprob_bits=12)
    with pytest.raises(CacheError, match="top-k encoding must be one of"):
        convert_cache(tmp_path / "p", "parquet", tmp_path / "z", topk_encoding="lz4")


def test_plain_caches_of_versions_1_0_and_1_1_still_read(tmp_path):
    fields = make_fields(8)
    write_cache(tmp_path / "p", "zarr", items(fields), fields)
    for version in ("1.0.0", "1.1.0"):
        edit_manifest(tmp_path / "p", lambda o: o.update(format_version=version))
        assert verify_cache(str(tmp_path / "p")) == [] and open_cache(tmp_path / "p").manifest.format_version == version


@pytest.mark.parametrize("edit, message", [
    (lambda f: f["topk_ids"].pop("encoding"), "must carry the same encoding"),
    (lambda f: f["topk_logprobs"]["encoding"].update(codebook=[-1.0] * 16), "strictly increasing"),
    (lambda f: f["input_ids"].update(encoding=f["topk_ids"]["encoding"]), "does not match the spec"),
    (lambda f: [f[n].update(dtype="BF16") for n in ("topk_logprobs",)], "a compact top-k is F32"),
])
def test_a_damaged_encoding_in_the_manifest_is_refused(compact_cache, edit, message):
    root, _, _ = compact_cache
    edit_manifest(root, lambda o: edit(o["fields"]))
    with pytest.raises(CacheError, match=message):
        open_cache(root)


def test_rank_bytes_too_few_for_the_vocabulary_are_refused(compact_cache):
    root, _, _ = compact_cache
    edit_manifest(root, lambda o: o["tokenizer"].update(vocab_size=300))
    with pytest.raises(CacheError, match="1 rank bytes cannot hold ranks of a 300-id vocabulary"):
        open_cache(root)


def _reread(root):
    cache = open_cache(root)
    return [cache.read_shard(e) for e in cache.shards()]


def test_damaged_parquet_parts_are_refused_with_a_clear_error(tmp_path):
    fields = compact_fields()
    write_cache(tmp_path / "c", "parquet", items(fields), fields)
    path = tmp_path / "c" / "shards" / "train-00000.parquet"
    table = pq.read_table(path)
    meta = pq.ParquetFile(path).schema_arrow.metadata

    def rewrite(name, column):
        t = table.set_column(table.schema.get_field_index(name), name, column)
        pq.write_table(t.replace_schema_metadata(meta), path, compression="zstd", use_dictionary=False)

    codes = table.column("topk_logprobs/codes").combine_chunks()
    raw = np.frombuffer(codes.values.buffers()[1], np.uint8).copy()
    raw[5] = 200
    values = pa.Array.from_buffers(codes.values.type, len(codes.values), [None, pa.py_buffer(raw)])
    rewrite("topk_logprobs/codes", pa.ListArray.from_arrays(codes.offsets, values))
    with pytest.raises(CacheError, match="train-00000.parquet.*code is 200, the codebook has 16 entries"):
        _reread(tmp_path / "c")
    rows = table.column("topk_ids/table").to_pylist()
    rewrite("topk_ids/table", pa.array([rows[0], [1, 2]] + rows[2:], pa.list_(pa.int32())))
    with pytest.raises(CacheError, match="must hold its array in the first row only"):
        _reread(tmp_path / "c")
    rewrite("topk_ids/table", pa.array([[3, 0, 1]] + rows[1:], pa.list_(pa.int32())))
    with pytest.raises(CacheError, match="rank table repeats an id"):
        _reread(tmp_path / "c")
    assert any("rank table repeats an id" in p for p in verify_cache(str(tmp_path / "c"), checksums=False))


def test_damaged_zarr_parts_are_refused_before_allocating(tmp_path):
    fields = compact_fields()
    write_cache(tmp_path / "c", "zarr", items(fields), fields)
    group = tmp_path / "c" / "shards" / "train-00000.zarr"
    meta_path = group / "topk_ids" / "table" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"] = [2**40]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CacheError, match=r"array 'topk_ids/table' has shape \(1099511627776,\), expected 1-D"):
        _reread(tmp_path / "c")
    meta["shape"] = [3, 2]  # inconsistent with its chunk grid: zarr's own check, reported as a CacheError
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="array 'topk_ids/table' is unreadable"):
        _reread(tmp_path / "c")


def test_damaged_zarr_codes_are_refused(tmp_path):
    fields = compact_fields()
    write_cache(tmp_path / "c", "zarr", items(fields), fields)
    arr = zarr.open_array(zarr.storage.LocalStore(str(tmp_path / "c" / "shards" / "train-00000.zarr")),
                          path="topk_logprobs/codes", mode="r+")
    arr[3, 2] = 99
    with pytest.raises(CacheError, match="code is 99, the codebook has 16 entries"):
        _reread(tmp_path / "c")
