"""The manifest: format and version checks first, then everything a reader relies on (SPEC.md, Manifest)."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import pytest

from formats.errors import CacheError
from formats.manifest import MAX_MANIFEST_BYTES, manifest_from_json, parse_manifest
from formats.reader import open_cache
from formats.schema import MAX_K, MAX_SHARD_TOKENS, MAX_VOCAB
from formats.verify import verify_cache
from tests.formats.synth import (
    default_fields,
    edit_manifest,
    make_sequences,
    write_cache,
)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A small finished Parquet cache: 3 train shards, 1 heldout shard."""
    fields = default_fields(8)
    seqs = make_sequences([12, 9, 14, 11, 7], fields)
    items = [("train", s) for s in seqs[:4]] + [("heldout", seqs[4])]
    write_cache(tmp_path / "cache", "parquet", items, fields, shard_tokens=12)
    return tmp_path / "cache"


def _json(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _refresh_counts(obj: dict) -> None:
    """Recompute splits and totals from the shard list, as an author of a consistent manifest would."""
    splits: dict = {}
    for s in obj["shards"]:
        d = splits.setdefault(s["split"], {"sequences": 0, "tokens": 0, "shards": 0})
        d["sequences"] += s["sequences"]
        d["tokens"] += s["tokens"]
        d["shards"] += 1
    obj["splits"] = splits
    obj["totals"] = {
        "sequences": sum(s["sequences"] for s in obj["shards"]),
        "tokens": sum(s["tokens"] for s in obj["shards"]),
        "bytes": sum(s["bytes"] for s in obj["shards"]),
        "shards": len(obj["shards"]),
    }


def test_a_written_manifest_parses_back_to_the_same_json(cache_dir):
    obj = _json(cache_dir)
    assert obj["format"] == "kdcache" and obj["format_version"] == "1.2.0" and obj["complete"] is True
    assert manifest_from_json(obj).to_json() == obj
    assert [s["path"] for s in obj["shards"]] == [
        "shards/train-00000.parquet", "shards/train-00001.parquet", "shards/train-00002.parquet",
        "shards/heldout-00000.parquet"]
    assert obj["splits"] == {"train": {"sequences": 4, "tokens": 46, "shards": 3},
                             "heldout": {"sequences": 1, "tokens": 7, "shards": 1}}
    assert obj["totals"]["sequences"] == 5 and obj["totals"]["tokens"] == 53 and obj["totals"]["shards"] == 4
    assert obj["totals"]["bytes"] == sum(os.path.getsize(cache_dir / s["path"]) for s in obj["shards"])


def test_a_manifest_of_another_format_is_refused(cache_dir):
    obj = _json(cache_dir)
    obj["format"] = "safetensors"
    with pytest.raises(CacheError, match="format is 'safetensors', expected 'kdcache'"):
        manifest_from_json(obj)


def test_an_unknown_major_version_is_refused_saying_which_major_this_build_reads(cache_dir):
    edit_manifest(cache_dir, lambda o: o.update(format_version="2.0.0"))
    with pytest.raises(CacheError, match=r"2\.0\.0 is not supported; this build of kdcache reads format 1\.x"):
        open_cache(cache_dir)


def test_the_major_version_is_checked_before_anything_else(cache_dir):
    # A 2.x manifest may look nothing like 1.x: the version error must come first, not a field error.
    with pytest.raises(CacheError, match=r"reads format 1\.x"):
        manifest_from_json({"format": "kdcache", "format_version": "2.0.0", "backend": "arrow-ipc", "fields": []})


@pytest.mark.parametrize("version", ["1.0", "1.0.0-rc1", "v1.0.0", 1, None])
def test_a_format_version_that_is_not_semantic_is_refused(cache_dir, version):
    obj = _json(cache_dir)
    obj["format_version"] = version
    with pytest.raises(CacheError, match="not a semantic version"):
        manifest_from_json(obj)


def test_a_newer_minor_version_with_an_unknown_top_level_key_opens_and_keeps_the_key(cache_dir):
    edit_manifest(cache_dir, lambda o: o.update(format_version="1.3.0", provenance={"by": "a later kdcache"}))
    cache = open_cache(cache_dir)
    assert cache.manifest.format_version == "1.3.0"
    assert cache.manifest.to_json()["provenance"] == {"by": "a later kdcache"}
    assert sum(len(b) for b in cache.iter_blocks()) == 5
    assert verify_cache(str(cache_dir)) == []


@pytest.mark.parametrize("key", ["teacher", "tokenizer", "build", "corpus", "fields"])
def test_a_manifest_without_a_required_object_is_refused_naming_it(cache_dir, key):
    obj = _json(cache_dir)
    del obj[key]
    with pytest.raises(CacheError, match=key):
        manifest_from_json(obj)


@pytest.mark.parametrize("edit, message", [
    (lambda o: o.update(backend="hdf5"), "backend must be one of"),
    (lambda o: o.update(complete="yes"), "complete must be true or false"),
    (lambda o: o.update(shards={}), "shards must be a list"),
    (lambda o: o["tokenizer"].update(vocab_size=0), "vocab_size"),
    (lambda o: o["tokenizer"].update(vocab_size=MAX_VOCAB + 1), "vocab_size"),
    (lambda o: o["build"].update(top_k=4), "build.top_k disagrees"),
    (lambda o: o["build"].pop("top_k"), "top_k"),
], ids=["backend", "complete", "shards_not_a_list", "vocab_0", "vocab_over_limit", "top_k_mismatch", "no_top_k"])
def test_a_manifest_with_a_bad_top_level_value_is_refused(cache_dir, edit, message):
    obj = _json(cache_dir)
    edit(obj)
    with pytest.raises(CacheError, match=message):
        manifest_from_json(obj)


def test_sample_draws_must_be_given_and_fit_the_count_dtype(cache_dir):
    obj = _json(cache_dir)
    obj["fields"]["sample_ids"] = {"per": "token", "dtype": "I32", "shape": [4]}
    obj["fields"]["sample_counts"] = {"per": "token", "dtype": "U8", "shape": [4]}
    obj["build"]["sample_draws"] = 0
    with pytest.raises(CacheError, match="sample_draws"):
        manifest_from_json(obj)
    obj["build"]["sample_draws"] = 256
    with pytest.raises(CacheError, match="does not fit U8"):
        manifest_from_json(obj)
    obj["fields"]["sample_counts"]["dtype"] = "U16"
    assert manifest_from_json(obj).sample_draws == 256


def test_a_top_k_above_the_limit_is_refused(cache_dir):
    obj = _json(cache_dir)
    k = MAX_K + 1
    obj["fields"]["topk_ids"]["shape"] = obj["fields"]["topk_logprobs"]["shape"] = [k]
    obj["build"]["top_k"] = k
    with pytest.raises(CacheError, match="above the limit"):
        manifest_from_json(obj)


@pytest.mark.parametrize("edit, message", [
    (lambda o: o["totals"].update(tokens=o["totals"]["tokens"] + 1), "totals"),
    (lambda o: o["totals"].update(shards=3), "totals"),
    (lambda o: o["splits"]["train"].update(sequences=3), "splits"),
    (lambda o: o["splits"].pop("heldout"), "splits"),
    (lambda o: o["shards"][1].update(tokens=o["shards"][1]["tokens"] + 1), "disagree"),
], ids=["total_tokens", "total_shards", "split_sequences", "missing_split", "shard_tokens"])
def test_counts_that_disagree_with_the_shard_list_are_refused(cache_dir, edit, message):
    edit_manifest(cache_dir, edit)
    with pytest.raises(CacheError, match=message):
        open_cache(cache_dir)
    problems = verify_cache(str(cache_dir))
    assert len(problems) == 1 and message in problems[0]


def test_a_shard_listed_twice_is_refused(cache_dir):
    def twice(o):
        o["shards"].append(dict(o["shards"][0]))
        _refresh_counts(o)

    edit_manifest(cache_dir, twice)
    with pytest.raises(CacheError, match="appears twice"):
        open_cache(cache_dir)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(bytes=s["bytes"] + 1), "not the sum of its files"),
    (lambda s: s.update(sha256=s["sha256"].upper()), "lowercase hex sha256"),
    (lambda s: s.update(content_sha256="0" * 63), "lowercase hex sha256"),
    (lambda s: s["files"][0].update(sha256=None), "lowercase hex sha256"),
    (lambda s: s.update(files=[]), "files must be a non-empty list"),
    (lambda s: s.update(split="train/../x"), "split must be a short name"),
    (lambda s: s.update(sequences=-1), "sequences must be an integer"),
    (lambda s: s.update(tokens=True), "tokens must be an integer"),
    (lambda s: s.update(sequences=s["tokens"] + 1), "more sequences"),
], ids=["bytes", "sha_upper", "content_sha_short", "file_sha_null", "no_files", "split_name", "negative",
        "bool_tokens", "more_sequences_than_tokens"])
def test_a_malformed_shard_entry_is_refused_naming_the_shard(cache_dir, edit, message):
    def change(o):
        edit(o["shards"][0])
        _refresh_counts(o)

    edit_manifest(cache_dir, change)
    with pytest.raises(CacheError, match=message) as e:
        open_cache(cache_dir)
    assert "shards/train-00000.parquet" in str(e.value) or "shards[0]" in str(e.value)


def test_a_shard_claiming_10e12_tokens_is_refused_before_any_allocation(cache_dir):
    def huge(o):
        s = o["shards"][0]
        s["tokens"] = s["bytes"] = s["files"][0]["bytes"] = 10**12
        _refresh_counts(o)

    edit_manifest(cache_dir, huge)
    tracemalloc.start()
    try:
        with pytest.raises(CacheError, match=rf"tokens must be an integer in \[0, {MAX_SHARD_TOKENS}\]"):
            open_cache(cache_dir)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


def test_a_shard_claiming_more_tokens_than_its_bytes_can_hold_is_refused(cache_dir):
    def many(o):
        o["shards"][0]["tokens"] = 2**30
        _refresh_counts(o)

    edit_manifest(cache_dir, many)
    with pytest.raises(CacheError, match="claims 1073741824 tokens in .* bytes, which cannot be"):
        open_cache(cache_dir)


def test_a_huge_manifest_is_refused_before_it_is_read(cache_dir):
    with open(cache_dir / "manifest.json", "r+b") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: costs no disk
    tracemalloc.start()
    try:
        with pytest.raises(CacheError, match="too large for a manifest"):
            open_cache(cache_dir)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20
    assert "too large for a manifest" in verify_cache(str(cache_dir))[0]


def test_parse_manifest_refuses_bytes_over_the_limit_without_parsing_them():
    class Huge(bytes):
        def __len__(self):
            return MAX_MANIFEST_BYTES + 1

    with pytest.raises(CacheError, match="too large for a manifest"):
        parse_manifest(Huge(b"{"))


@pytest.mark.parametrize("data", [b"", b"{", b"\xff\xfe", b"[1, 2]", b"null"], ids=["empty", "truncated", "not_utf8",
                                                                                       "list", "null"])
def test_a_manifest_that_is_not_a_json_object_is_refused(tmp_path, data):
    (tmp_path / "manifest.json").write_bytes(data)
    with pytest.raises(CacheError, match="manifest.json"):
        open_cache(tmp_path)


def test_a_directory_without_a_manifest_is_not_a_cache(tmp_path):
    with pytest.raises(CacheError, match="no manifest.json; not a kdcache cache"):
        open_cache(tmp_path)


def test_an_incomplete_cache_opens_but_is_refused_where_completeness_is_required(cache_dir):
    edit_manifest(cache_dir, lambda o: o.update(complete=False))
    assert open_cache(cache_dir).manifest.complete is False
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(cache_dir, require_complete=True)
    assert verify_cache(str(cache_dir)) == [f"{cache_dir}: the cache is incomplete (build interrupted or running)"]


def test_a_version_1_0_0_cache_still_opens(cache_dir):
    # 1.1.0 added samples-only caches (k = 0); every 1.0.0 cache is a valid 1.1.0 cache.
    edit_manifest(cache_dir, lambda o: o.update(format_version="1.0.0"))
    cache = open_cache(cache_dir)
    assert cache.manifest.format_version == "1.0.0" and cache.read_shard(cache.shards()[0]).num_tokens > 0
