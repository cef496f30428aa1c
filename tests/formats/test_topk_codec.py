"""The compact top-k codec (formats/topk_codec.py): what it keeps exactly, the bound it keeps the rest within, and
how it refuses stored data it cannot decode."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formats.errors import CacheError
from formats.topk_codec import (
    FLOOR,
    CompactTopk,
    decode_table,
    decode_topk,
    encode_topk,
    make_codebook,
)


def teacher_rows(rng: np.random.Generator, t: int, vocab: int, k: int, temperature: float = 3.0,
                 zipf: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows as the builder captures them: top-k ids most probable first, their float32 log-probs, the float32 tail.

    With `zipf` the logits lean towards small ids, as a real teacher's do (common tokens are frequent everywhere)."""
    logits = rng.normal(size=(t, vocab)) * temperature
    if zipf:
        logits -= 1.5 * np.log1p(np.arange(vocab))[None, :]
    logp = (logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
            - logits.max(1, keepdims=True)).astype(np.float32)
    ids = np.argsort(-logp, axis=1, kind="stable")[:, :k].astype(np.int32)
    lp = np.take_along_axis(logp, ids, axis=1)
    p = np.exp(logp.astype(np.float64))
    np.put_along_axis(p, ids.astype(np.int64), 0.0, axis=1)
    tail = np.log(p.sum(1)).astype(np.float32)
    return ids, lp, tail


def round_trip(ids, lp, enc):
    parts = encode_topk(ids, lp, enc)
    table = decode_table(parts.table_diff, enc, "test")
    return parts, decode_topk(parts.top1_id, parts.top1_logprob, parts.rank_planes, parts.codes, table, enc, "test")


def source_of(ids, lp, out_ids):
    """The source log-prob of each decoded entry (decoded ids are the source's, in another order)."""
    pos = {}
    out = np.empty(out_ids.shape, np.float32)
    for r in range(len(ids)):
        pos = dict(zip(ids[r].tolist(), lp[r].tolist()))
        out[r] = [pos[i] for i in out_ids[r].tolist()]
    return out


def check_contract(ids, lp, enc):
    """Everything SPEC.md promises about one encoded block, checked against its source."""
    _, (out_ids, out_lp) = round_trip(ids, lp, enc)
    assert out_ids.dtype == np.int32 and out_lp.dtype == np.float32 and out_ids.shape == ids.shape
    # the top-1 id and log-prob are the source's, bit for bit; the ids are the same set
    assert np.array_equal(out_ids[:, 0], ids[:, 0]) and out_lp[:, 0].tobytes() == lp[:, 0].tobytes()
    assert np.array_equal(np.sort(out_ids, axis=1), np.sort(ids, axis=1))
    # most probable first, and the top-1 strictly above every other entry
    assert (np.diff(out_lp[:, 1:], axis=1) <= 0).all() and (out_lp[:, 0:1] > out_lp[:, 1:]).all()
    # ties among equal codes go by id
    same = out_lp[:, 1:-1] == out_lp[:, 2:]
    assert (out_ids[:, 1:-1][same] < out_ids[:, 2:][same]).all()
    cb = enc.values
    codes = np.searchsorted(cb, out_lp[:, 1:])
    assert (cb[codes] == out_lp[:, 1:]).all()
    # the bound: the source's probability lies between the code's two neighbours
    src = np.exp(source_of(ids, lp, out_ids)[:, 1:].astype(np.float64))
    vals = np.exp(cb.astype(np.float64))
    lower = np.where(codes > 0, vals[np.maximum(codes - 1, 0)], 0.0)
    upper = np.where(codes < len(cb) - 1, vals[np.minimum(codes + 1, len(cb) - 1)], np.inf)
    assert (lower <= src).all() and (src <= upper).all()
    # the stored mass is never above the source's (but for entries below the codebook's floor)
    below_floor = (src < vals[0]).sum(axis=1) * vals[0]
    assert (vals[codes].sum(axis=1) <= src.sum(axis=1) + below_floor + 1e-12).all()
    return out_ids, out_lp


def test_codebook_is_uniform_in_g_from_the_floor_to_one_half():
    for bits in (2, 6, 8):
        cb = np.asarray(make_codebook(bits), np.float64)
        assert len(cb) == 1 << bits and (np.diff(cb) > 0).all()
        assert cb[0] == np.float32(math.log(FLOOR)) and cb[-1] == np.float32(math.log(0.5))
        g = np.exp(cb / 2) + 2.0**-11 * cb
        np.testing.assert_allclose(np.diff(g), np.diff(g).mean(), rtol=1e-4)


@pytest.mark.parametrize("k", [2, 8, 64])
@pytest.mark.parametrize("bits", [2, 6, 8])
def test_round_trip_keeps_top1_and_id_set_exactly_and_the_rest_within_the_bound(k, bits):
    rng = np.random.default_rng(k * 10 + bits)
    ids, lp, _ = teacher_rows(rng, 200, 3000, k)
    check_contract(ids, lp, CompactTopk.make(bits, 3000))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(2, 40), t=st.integers(1, 30), temperature=st.sampled_from([0.3, 3.0, 12.0]),
       vocab=st.sampled_from([60, 300, 70000]), bits=st.integers(2, 8), zipf=st.booleans())
def test_any_distribution_round_trips_within_the_contract(seed, k, t, temperature, vocab, bits, zipf):
    ids, lp, _ = teacher_rows(np.random.default_rng(seed), t, vocab, min(k, vocab), temperature, zipf)
    check_contract(ids, lp, CompactTopk.make(bits, vocab))


def test_three_rank_bytes_for_a_large_vocabulary():
    enc = CompactTopk.make(6, 200_000)
    assert enc.rank_bytes == 3
    rng = np.random.default_rng(1)
    ids = np.stack([rng.choice(200_000, 16, replace=False) for _ in range(50)]).astype(np.int32)
    lp = np.sort(np.log(rng.dirichlet(np.ones(17), size=50)[:, :16]), axis=1)[:, ::-1].astype(np.float32)
    check_contract(ids, lp, enc)


def test_ties_and_a_second_entry_as_probable_as_the_top1_keep_the_top1_strictly_first():
    ids = np.array([[5, 9, 2, 7], [1, 2, 3, 4]], np.int32)
    lp = np.log(np.array([[0.3, 0.3, 0.3, 0.05], [0.25, 0.25, 0.25, 0.25]])).astype(np.float32)
    out_ids, out_lp = check_contract(ids, lp, CompactTopk.make(6, 16))
    assert out_ids[:, 0].tolist() == [5, 1]


def test_zero_probabilities_get_the_floor_not_zero():
    ids = np.array([[3, 1, 2]], np.int32)
    lp = np.array([[0.0, -np.inf, -np.inf]], np.float32)
    _, (_, out_lp) = round_trip(ids, lp, CompactTopk.make(6, 8))
    assert out_lp[0, 0] == 0.0 and (out_lp[0, 1:] == np.float32(math.log(FLOOR))).all()


def test_a_decoded_block_encodes_to_the_same_codes():
    rng = np.random.default_rng(3)
    ids, lp, _ = teacher_rows(rng, 300, 5000, 32)
    enc = CompactTopk.make(5, 5000)
    first, (ids2, lp2) = round_trip(ids, lp, enc)
    second, (ids3, lp3) = round_trip(ids2, lp2, enc)
    assert np.array_equal(ids2, ids3) and lp2.tobytes() == lp3.tobytes()
    assert np.array_equal(first.codes, second.codes) and np.array_equal(first.table_diff, second.table_diff)


def test_common_ids_get_small_ranks():
    ids = np.array([[9, 40, 41], [8, 40, 42], [7, 40, 41]], np.int32)
    parts, _ = round_trip(ids, np.log(np.array([[0.5, 0.2, 0.1]] * 3)).astype(np.float32), CompactTopk.make(6, 64))
    table = decode_table(parts.table_diff, CompactTopk.make(6, 64), "t")
    assert table.tolist() == [40, 41, 42]  # 40 in 3 rows, 41 in 2 (both bucket 1), 42 in 1


def test_encoding_refuses_what_it_cannot_store():
    enc = CompactTopk.make(6, 64)
    ids = np.array([[1, 2, 3]], np.int32)
    with pytest.raises(CacheError, match="NaN"):
        encode_topk(ids, np.array([[-1, np.nan, -3]], np.float32), enc)
    with pytest.raises(CacheError, match="k >= 2"):
        encode_topk(ids[:, :1], np.zeros((1, 1), np.float32), enc)
    with pytest.raises(CacheError, match=r"\[0, 256\)"):
        encode_topk(np.array([[1, 300, 3]], np.int32), np.log(np.array([[0.5, 0.2, 0.1]], np.float32)), enc)
    with pytest.raises(CacheError, match="not above the codebook"):
        encode_topk(ids, np.array([[-40, -41, -42]], np.float32), enc)


def _parts(enc=None):
    enc = enc or CompactTopk.make(6, 64)
    ids, lp, _ = teacher_rows(np.random.default_rng(0), 20, 64, 8)
    parts = encode_topk(ids, lp, enc)
    return enc, parts, decode_table(parts.table_diff, enc, "t")


def test_damaged_codes_ranks_and_tables_are_refused_with_a_clear_error():
    enc, parts, table = _parts()

    def decode(codes=parts.codes, planes=parts.rank_planes, tab=table):
        return decode_topk(parts.top1_id, parts.top1_logprob, planes, codes, tab, enc, "shard x")

    codes = parts.codes.copy()
    codes[3, 2] = 64
    with pytest.raises(CacheError, match="shard x: a top-k log-prob code is 64, the codebook has 64 entries"):
        decode(codes=codes)
    planes = [p.copy() for p in parts.rank_planes]
    planes[0][5, 0] = 200  # every later rank of the row moves past the table
    with pytest.raises(CacheError, match="shard x: a top-k rank is .* the shard's table has"):
        decode(planes=planes)
    with pytest.raises(CacheError, match="rank table repeats an id"):
        decode_table(np.array([3, 0, 1], np.int32), enc, "t")
    with pytest.raises(CacheError, match="outside"):
        decode_table(np.array([3, -5], np.int32), enc, "t")
    with pytest.raises(CacheError, match="outside"):
        decode_table(np.array([255, 1], np.int32), enc, "t")  # 256 needs a second rank byte
    # a table of 2^31 - 1 steps does not overflow into a valid id
    with pytest.raises(CacheError, match="outside"):
        decode_table(np.array([2**31 - 1, 2**31 - 1, 2], np.int32), CompactTopk.make(6, 2**31 - 1), "t")


def test_the_manifest_encoding_object_is_checked():
    good = CompactTopk.make(3, 64).to_json()
    assert CompactTopk.from_json("topk_ids", good) == CompactTopk.make(3, 64)
    bad = [
        ({**good, "name": "zstd-dict"}, "unknown encoding"),
        ({k: v for k, v in good.items() if k != "codebook"}, "expected an object"),
        ({**good, "logprob_bits": 9}, "logprob_bits"),
        ({**good, "logprob_bits": True}, "logprob_bits"),
        ({**good, "rank_bytes": 0}, "rank_bytes"),
        ({**good, "source_dtype": "F64"}, "source_dtype"),
        ({**good, "codebook": good["codebook"][:-1]}, "list of 8 numbers"),
        ({**good, "codebook": good["codebook"][::-1]}, "strictly increasing"),
        ({**good, "codebook": good["codebook"][:-1] + [0.5]}, "below 0"),
        ({**good, "codebook": good["codebook"][:-1] + [-0.1]}, "float32"),  # -0.1 is not a float32 value
        ({**good, "codebook": good["codebook"][:-1] + ["x"]}, "numbers"),
    ]
    for obj, message in bad:
        with pytest.raises(CacheError, match=message):
            CompactTopk.from_json("topk_ids", obj)
