"""The usual data tools read a cache correctly, with the real packages: `datasets.load_dataset` gives every split
(from the card's YAML configs), pandas / DuckDB / polars read the Parquet shards, xarray opens a Zarr shard (its
arrays carry dimension_names); and every snippet the generated card shows runs and prints what kdcache reads."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from formats.reader import open_cache
from formats.schema import to_float32


def _code_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, re.S)


def _nanmean_target(root, split: str) -> float:
    cache = open_cache(root)
    return float(np.nanmean(np.concatenate([b.token["target_logprob"] for b in cache.iter_blocks(split)])))


@pytest.mark.parametrize("backend", ["parquet"])  # datasets reads Parquet (a Zarr cache: kdcache convert --to parquet)
def test_load_dataset_gives_every_split_of_a_parquet_cache(small_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from datasets import load_dataset

    ds = load_dataset(str(small_cache.root))
    splits = small_cache.manifest.splits()
    assert {name: len(d) for name, d in ds.items()} == {name: s["sequences"] for name, s in splits.items()}
    first = open_cache(small_cache.root).sequence(0, "train")
    assert ds["train"][0]["input_ids"] == first["input_ids"].tolist()


@pytest.mark.parametrize("backend", ["parquet"])
def test_pandas_duckdb_and_polars_read_the_parquet_shards_as_kdcache_does(small_cache):
    import duckdb
    import pandas as pd
    import polars as pl

    files = [str(small_cache.root / s.path) for s in small_cache.manifest.split_shards("train")]
    want = _nanmean_target(small_cache.root, "train")
    df = pd.read_parquet(files)
    assert len(df) == small_cache.manifest.splits()["train"]["sequences"]
    assert np.isclose(np.nanmean(np.concatenate(df["target_logprob"].to_numpy())), want)
    got = duckdb.execute("SELECT avg(x) FROM (SELECT unnest(target_logprob) AS x FROM read_parquet($f)) "
                         "WHERE NOT isnan(x)", {"f": files}).fetchone()[0]
    assert np.isclose(got, want)
    assert np.isclose(pl.read_parquet(files).select(pl.col("target_logprob").explode().fill_nan(None).mean()).item(), want)


@pytest.mark.parametrize("backend", ["zarr"])
def test_xarray_opens_a_zarr_shard_with_named_dimensions(small_cache):
    import xarray as xr

    entry = small_cache.manifest.shards[0]
    ds = xr.open_zarr(small_cache.root / entry.path, consolidated=False)
    assert ds["topk_ids"].dims == ("token", "topk_ids_dim") and ds["doc_index"].dims == ("sequence",)
    assert ds.sizes["token"] == entry.tokens and ds.sizes["sequence_edge"] == entry.sequences + 1
    block = open_cache(small_cache.root).read_shard(entry)
    assert np.array_equal(ds["input_ids"].values, block.token["input_ids"])
    assert np.array_equal(ds["target_logprob"].values, block.token["target_logprob"], equal_nan=True)


def test_every_snippet_of_the_card_runs_in_the_cache_folder_and_prints_what_kdcache_reads(small_cache, tmp_path):
    card = (small_cache.root / "README.md").read_text()
    assert card.startswith("---\n")
    blocks = _code_blocks(card)
    assert len(blocks) >= (5 if small_cache.backend == "parquet" else 3)
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    want = _nanmean_target(small_cache.root, "train")  # Parquet snippets read the split, Zarr ones its first shard
    if small_cache.backend == "zarr":
        first = open_cache(small_cache.root).read_shard(small_cache.manifest.shards[0])
        want = float(np.nanmean(first.token["target_logprob"]))
    bf16 = next(n for n, s in small_cache.fields.items() if s.dtype == "BF16")
    first_bf16 = to_float32(open_cache(small_cache.root).read_shard(small_cache.manifest.shards[0]).token[bf16],
                            "BF16").reshape(-1)[:4]
    for code in blocks:
        proc = subprocess.run([sys.executable, "-c", code], cwd=small_cache.root, capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode == 0, f"{code}\n{proc.stderr[-2000:]}"
        numbers = [float(x) for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", proc.stdout)]
        if "mean target" in code or "avg(x)" in code or ".mean()" in code:
            assert numbers and np.isclose(numbers[-1], want, rtol=1e-5), f"{code}\nprinted {proc.stdout}"
        if "as float32" in code:
            assert np.allclose(numbers[-4:], first_bf16, rtol=1e-3), f"{code}\nprinted {proc.stdout}"
