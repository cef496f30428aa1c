"""`kdcache convert --top-k K --drop-samples`: a smaller cache derived from a bigger one, as a build with those
settings would have written it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from formats.convert import convert_cache
from formats.errors import CacheError
from formats.reader import open_cache
from formats.schema import make_fields, to_float32
from formats.verify import verify_cache
from tests.formats.synth import make_sequences, same_bytes, write_cache

VOCAB, DRAWS = 64, 16


def _source(tmp_path: Path, backend: str = "parquet", k: int = 16, logprob_dtype: str = "F32") -> Path:
    fields = make_fields(k, logprob_dtype=logprob_dtype, sample_slots=DRAWS, count_dtype="U8")
    seqs = make_sequences([7, 12, 5, 9], fields, VOCAB, DRAWS)
    root = tmp_path / "src"
    write_cache(root, backend, [("train", s) for s in seqs[:3]] + [("heldout", seqs[3])], fields, VOCAB, DRAWS,
                shard_tokens=10)
    return root


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
def test_derived_topk_is_the_first_k_entries_and_the_rest_joins_the_tail(tmp_path, backend):
    src = _source(tmp_path, backend)
    out = tmp_path / "k4"
    m = convert_cache(src, backend, out, top_k=4, drop_samples=True)
    assert m.top_k == 4 and m.sample_draws == 0 and "sample_ids" not in m.fields
    assert m.build["derived_from"] == {"top_k": 16, "sample_draws": DRAWS}
    assert verify_cache(str(out)) == []
    a, b = open_cache(src), open_cache(out)
    assert [(s.split, s.sequences, s.tokens) for s in a.shards()] == [(s.split, s.sequences, s.tokens) for s in b.shards()]
    for ea, eb in zip(a.shards(), b.shards()):
        big, small = a.read_shard(ea), b.read_shard(eb)
        assert same_bytes(big.token["topk_ids"][:, :4], small.token["topk_ids"])
        assert same_bytes(big.token["topk_logprobs"][:, :4], small.token["topk_logprobs"])
        for name in ("input_ids", "target_logprob"):
            assert same_bytes(big.token[name], small.token[name])
        # mass outside the top 4 = mass outside the top 16 + the 12 dropped entries
        lp = big.token["topk_logprobs"].astype(np.float64)
        expected = np.log(np.exp(big.token["tail_logmass"].astype(np.float64)) + np.exp(lp[:, 4:]).sum(1))
        np.testing.assert_allclose(small.token["tail_logmass"], expected, rtol=1e-6)


def test_samples_can_be_kept_and_the_same_k_with_samples_kept_is_a_plain_copy(tmp_path):
    src = _source(tmp_path)
    m = convert_cache(src, "parquet", tmp_path / "k8", top_k=8)
    assert m.top_k == 8 and m.sample_draws == DRAWS and "sample_ids" in m.fields
    assert verify_cache(str(tmp_path / "k8")) == []
    same = convert_cache(src, "parquet", tmp_path / "same", top_k=16)
    assert "derived_from" not in same.build
    assert [s.content_sha256 for s in same.shards] == [s.content_sha256 for s in open_cache(src).shards()]


def test_bf16_logprobs_derive_a_tail_within_verify_tolerance(tmp_path):
    src = _source(tmp_path, logprob_dtype="BF16")
    convert_cache(src, "parquet", tmp_path / "k3", top_k=3, drop_samples=True)
    assert verify_cache(str(tmp_path / "k3")) == []
    block = open_cache(tmp_path / "k3").read_shard(open_cache(tmp_path / "k3").shards()[0])
    lp = to_float32(block.token["topk_logprobs"], "BF16").astype(np.float64)
    total = np.exp(lp).sum(1) + np.exp(block.token["tail_logmass"].astype(np.float64))
    assert np.all(np.abs(total - 1) < 3e-2)


@pytest.mark.parametrize("k", [-1, 17])
def test_a_top_k_outside_zero_to_the_cache_k_is_refused(tmp_path, k):
    with pytest.raises(CacheError, match=r"--top-k must be in \[0, 16\]"):
        convert_cache(_source(tmp_path), "parquet", tmp_path / "bad", top_k=k)


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
def test_top_k_zero_keeps_the_samples_alone_with_all_mass_in_the_tail(tmp_path, backend):
    src = _source(tmp_path, backend)
    m = convert_cache(src, backend, tmp_path / "k0", top_k=0)
    assert m.top_k == 0 and m.build["top_k"] == 0 and "topk_ids" not in m.fields and "topk_logprobs" not in m.fields
    assert m.sample_draws == DRAWS and verify_cache(str(tmp_path / "k0")) == []
    a, b = open_cache(src), open_cache(tmp_path / "k0")
    for ea, eb in zip(a.shards(), b.shards()):
        big, small = a.read_shard(ea), b.read_shard(eb)
        for name in ("input_ids", "target_logprob", "sample_ids", "sample_counts"):
            assert same_bytes(big.token[name], small.token[name])
        assert np.all(small.token["tail_logmass"] == 0) and set(small.token) == set(big.token) - {"topk_ids", "topk_logprobs"}


def test_top_k_zero_without_samples_to_keep_is_refused(tmp_path):
    src = _source(tmp_path)
    with pytest.raises(CacheError, match="--drop-samples with top-k 0 would leave no teacher distribution$"):
        convert_cache(src, "parquet", tmp_path / "bad", top_k=0, drop_samples=True)
    convert_cache(src, "parquet", tmp_path / "k4", top_k=4, drop_samples=True)
    with pytest.raises(CacheError, match="keeps only the RS-KD samples, and this cache has none"):
        convert_cache(tmp_path / "k4", "parquet", tmp_path / "bad2", top_k=0)
    convert_cache(src, "parquet", tmp_path / "k0", top_k=0)
    with pytest.raises(CacheError, match=r"no teacher distribution \(this cache keeps only RS-KD samples\)"):
        convert_cache(tmp_path / "k0", "parquet", tmp_path / "bad3", drop_samples=True)


def test_cli_derives_with_the_source_backend_by_default(tmp_path):
    src = _source(tmp_path, backend="zarr")
    proc = subprocess.run([sys.executable, "-m", "kdcache.cli", "convert", str(src), "--out", str(tmp_path / "k2"),
                           "--top-k", "2", "--drop-samples"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "top-k 2, 0 RS-KD draws" in proc.stdout
    m = open_cache(tmp_path / "k2").manifest
    assert m.backend == "zarr" and m.top_k == 2
