"""`kdcache convert`: the same logical arrays in the other backend, shard for shard (SPEC.md, Backends)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formats.convert import convert_cache
from formats.errors import CacheError
from formats.reader import open_cache
from formats.schema import HIDDEN_DTYPES, LOGPROB_DTYPES, make_fields
from formats.verify import verify_cache
from tests.formats.synth import (
    default_fields,
    edit_manifest,
    make_sequences,
    random_sequence,
    same_bytes,
    write_cache,
)


def _assert_same_content(a: Path, b: Path) -> None:
    """Two caches hold the same shards (split, counts, content checksum) and bit-identical arrays."""
    ca, cb = open_cache(a), open_cache(b)
    assert ca.manifest.fields == cb.manifest.fields
    key = [(s.split, s.sequences, s.tokens, s.content_sha256) for s in ca.shards()]
    assert key == [(s.split, s.sequences, s.tokens, s.content_sha256) for s in cb.shards()]
    for ea, eb in zip(ca.shards(), cb.shards()):
        ba, bb = ca.read_shard(ea), cb.read_shard(eb)
        assert ba.offsets.tolist() == bb.offsets.tolist()
        for name, spec in ca.manifest.fields.items():
            arrays = (ba.token, bb.token) if spec.per == "token" else (ba.sequence, bb.sequence)
            assert same_bytes(arrays[0][name], arrays[1][name]), (ea.path, name)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.sampled_from([1, 8, 64]),
    logprob_dtype=st.sampled_from(LOGPROB_DTYPES),
    slots=st.sampled_from([0, 3]),
    hidden_dtype=st.sampled_from((None, *HIDDEN_DTYPES)),
    items=st.lists(st.tuples(st.sampled_from(["train", "heldout"]), st.integers(1, 30)), max_size=6),
    seed=st.integers(0, 2**32 - 1),
)
def test_zarr_to_parquet_to_zarr_preserves_every_shard(k, logprob_dtype, slots, hidden_dtype, items, seed):
    fields = make_fields(k, logprob_dtype=logprob_dtype, sample_slots=slots, count_dtype="U16",
                         hidden={4: (6, hidden_dtype)} if hidden_dtype else None, loss_mask=True)
    rng = np.random.default_rng(seed)
    seqs = [(split, random_sequence(rng, n, fields, 64, 300 if slots else 0, j)) for j, (split, n) in enumerate(items)]
    with tempfile.TemporaryDirectory() as tmp:
        zarr1, parquet, zarr2 = Path(tmp) / "zarr1", Path(tmp) / "parquet", Path(tmp) / "zarr2"
        original = write_cache(zarr1, "zarr", seqs, fields, draws=300, shard_tokens=max(1, sum(n for _, n in items) // 3))
        convert_cache(zarr1, "parquet", parquet)
        convert_cache(parquet, "zarr", zarr2)
        assert open_cache(parquet).manifest.backend == "parquet"
        _assert_same_content(zarr1, parquet)
        _assert_same_content(zarr1, zarr2)
        # deterministic writing: the round trip reproduces the original Zarr files byte for byte
        assert [s.sha256 for s in open_cache(zarr2).shards()] == [s.sha256 for s in original.shards]
        assert verify_cache(str(parquet)) == [] and verify_cache(str(zarr2)) == []


def test_convert_keeps_the_settings_and_unknown_keys_of_the_source_manifest(small_cache, tmp_path):
    edit_manifest(small_cache.root, lambda o: o.update(provenance={"by": "a test"}))
    other = "zarr" if small_cache.backend == "parquet" else "parquet"
    m = convert_cache(small_cache.root, other, tmp_path / "out")
    src = json.loads((small_cache.root / "manifest.json").read_text())
    out = json.loads((tmp_path / "out" / "manifest.json").read_text())
    for key in ("teacher", "tokenizer", "build", "corpus", "fields", "splits", "provenance", "created_by"):
        assert out[key] == src[key], key
    assert out["backend"] == other and out["complete"] is True and m.complete
    assert [s["path"] for s in out["shards"]] == [s["path"].replace(small_cache.backend, other) for s in src["shards"]]
    _assert_same_content(small_cache.root, tmp_path / "out")


def test_an_interrupted_conversion_resumes_and_ends_with_the_same_cache(small_cache, tmp_path):
    other = "zarr" if small_cache.backend == "parquet" else "parquet"
    out = tmp_path / "out"
    whole = [s.to_json() for s in convert_cache(small_cache.root, other, out).shards]

    def drop_last_shard(o):  # as if the process died before publishing the last shard
        o["shards"].pop()
        o["complete"] = False
        o["splits"].pop("heldout")
        o["totals"] = {k: sum(s[k] for s in o["shards"]) for k in ("sequences", "tokens", "bytes")}
        o["totals"]["shards"] = len(o["shards"])

    edit_manifest(out, drop_last_shard)
    assert open_cache(out).manifest.complete is False
    convert_cache(small_cache.root, other, out)
    assert [s.to_json() for s in open_cache(out).shards()] == whole
    assert verify_cache(str(out)) == []


def test_convert_refuses_to_write_over_its_source(small_cache):
    with pytest.raises(CacheError, match="never writes over what it reads"):
        convert_cache(small_cache.root, "parquet", small_cache.root)
    assert verify_cache(str(small_cache.root)) == []


def test_convert_refuses_an_incomplete_source(tmp_path):
    fields = default_fields(4)
    write_cache(tmp_path / "src", "parquet", [("train", s) for s in make_sequences([5], fields)], fields)
    edit_manifest(tmp_path / "src", lambda o: o.update(complete=False))
    with pytest.raises(CacheError, match="incomplete"):
        convert_cache(tmp_path / "src", "zarr", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_refuses_an_existing_cache_of_other_settings_unless_told_to_overwrite(small_cache, tmp_path):
    fields = default_fields(4)
    write_cache(tmp_path / "out", "parquet", [("train", s) for s in make_sequences([5], fields)], fields)
    with pytest.raises(CacheError, match="other settings"):
        convert_cache(small_cache.root, "parquet", tmp_path / "out")
    convert_cache(small_cache.root, "parquet", tmp_path / "out", overwrite=True)
    _assert_same_content(small_cache.root, tmp_path / "out")
