"""CacheWriter: atomic publication, resume, settings checks, the lock, the card, write failures
(SPEC.md, Layout; formats/writer.py)."""

from __future__ import annotations

import json
import os
import resource
import signal
from pathlib import Path

import numpy as np
import pytest

from formats.errors import CacheError
from formats.reader import open_cache
from formats.schema import SeqBlock
from formats.verify import verify_cache
from formats.writer import CacheWriter
from tests.formats.synth import (
    DRAWS,
    VOCAB,
    default_fields,
    make_manifest,
    make_sequences,
    ShardCutter,
    rich_fields,
    write_cache,
)

LENGTHS = [10, 10, 12, 8, 9, 11, 7]  # with shard_tokens=20: train shards of 2, 2, 2 and 1 sequences


def _writer(root: Path, backend: str, fields=None, shard_tokens: int = 20, **kw) -> ShardCutter:
    fields = fields or rich_fields()
    return ShardCutter(CacheWriter(root, make_manifest(backend, fields, VOCAB, DRAWS if "sample_ids" in fields else 0),
                                   shard_tokens, **kw))


def _listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def test_shards_close_once_they_hold_shard_tokens_and_splits_are_cut_separately(tmp_path):
    fields = default_fields(4)
    seqs = make_sequences([5, 5, 5, 5, 5, 12, 3], fields)
    items = [("train", s) for s in seqs[:5]] + [("heldout", seqs[5]), ("heldout", seqs[6])]
    m = write_cache(tmp_path / "c", "parquet", items, fields, shard_tokens=10)
    assert [(s.path, s.sequences, s.tokens) for s in m.shards] == [
        ("shards/train-00000.parquet", 2, 10), ("shards/train-00001.parquet", 2, 10),
        ("shards/heldout-00000.parquet", 1, 12), ("shards/train-00002.parquet", 1, 5),
        ("shards/heldout-00001.parquet", 1, 3)]


def test_each_shard_is_named_by_the_manifest_on_disk_as_soon_as_it_is_published(tmp_path, backend):
    seqs = make_sequences(LENGTHS, rich_fields())
    with _writer(tmp_path / "c", backend) as w:
        assert _manifest(tmp_path / "c")["complete"] is False and _manifest(tmp_path / "c")["shards"] == []
        assert w.add("train", seqs[0]) is None
        entry = w.add("train", seqs[1])
        assert entry is not None and entry.path == f"shards/train-00000.{backend}"
        on_disk = _manifest(tmp_path / "c")
        assert [s["path"] for s in on_disk["shards"]] == [entry.path] and on_disk["complete"] is False
        cache = open_cache(tmp_path / "c")  # readable mid-build, refused where completeness is required
        assert cache.read_shard(cache.shards()[0]).num_tokens == 20
        with pytest.raises(CacheError, match="incomplete"):
            open_cache(tmp_path / "c", require_complete=True)
        assert [n for n in os.listdir(tmp_path / "c" / "shards") if ".tmp-" in n] == []
        w.finish()
    assert _manifest(tmp_path / "c")["complete"] is True


def _interrupted(root: Path, backend: str, seqs: list[dict], upto: int) -> list[str]:
    """Add the first `upto` sequences, then stop without finish (the process 'died'); returns published paths."""
    w = _writer(root, backend)
    for s in seqs[:upto]:
        w.add("train", s)
    w.close()
    return [s["path"] for s in _manifest(root)["shards"]]


def _leave_crash_debris(root: Path, backend: str) -> list[Path]:
    """What a writer killed mid-shard leaves: a half-written temp shard, a shard renamed into place but
    never named by the manifest, a temp manifest."""
    shards = root / "shards"
    debris = [shards / f".train-00001.{backend}.tmp-123", shards / f"train-00005.{backend}", root / ".manifest.json.tmp-123"]
    for p in debris[:2]:
        if backend == "zarr":  # a group: a folder of files
            (p / "input_ids").mkdir(parents=True)
            (p / "input_ids" / "zarr.json").write_text("{}")
        else:
            p.write_bytes(b"PAR1 half a file")
    debris[2].write_text('{"half": ')
    return debris


def test_resuming_after_a_killed_writer_removes_the_leftovers_and_keeps_the_published_shards(tmp_path, backend):
    root = tmp_path / "c"
    seqs = make_sequences(LENGTHS, rich_fields())
    published = _interrupted(root, backend, seqs, upto=5)
    assert published == [f"shards/train-00000.{backend}", f"shards/train-00001.{backend}"]
    before = {p: (root / p).stat().st_mtime_ns for p in _listing(root) if p.startswith("shards/train-0000")}
    debris = _leave_crash_debris(root, backend)

    with _writer(root, backend) as w:
        assert not any(p.exists() for p in debris)
        assert [s.path for s in w.manifest.shards] == published
        assert {p: (root / p).stat().st_mtime_ns for p in before} == before  # published shards untouched
        assert w.done_sequences("train") == 4
        for s in seqs[w.done_sequences("train"):]:
            w.add("train", s)
        m = w.finish()
    assert [s.sequences for s in m.shards] == [2, 2, 2, 1]
    assert verify_cache(str(root)) == []


def test_a_resumed_write_gives_the_same_shard_bytes_as_an_uninterrupted_write(tmp_path, backend):
    seqs = make_sequences(LENGTHS, rich_fields())
    whole = write_cache(tmp_path / "whole", backend, [("train", s) for s in seqs], rich_fields())
    root = tmp_path / "resumed"
    _interrupted(root, backend, seqs, upto=3)
    _leave_crash_debris(root, backend)
    with _writer(root, backend) as w:
        for s in seqs[w.done_sequences("train"):]:
            w.add("train", s)
        resumed = w.finish()
    assert [s.to_json() for s in resumed.shards] == [s.to_json() for s in whole.shards]
    assert _listing(root) == _listing(tmp_path / "whole")


def test_reopening_with_a_different_top_k_is_refused_naming_build_top_k_and_leaves_the_cache_alone(small_cache):
    before = (small_cache.root / "manifest.json").read_bytes()
    with pytest.raises(CacheError, match=r"other settings \(build\.top_k: 8 != 4\)"):
        _writer(small_cache.root, small_cache.backend, fields=rich_fields(k=4))
    assert (small_cache.root / "manifest.json").read_bytes() == before
    assert verify_cache(str(small_cache.root)) == []
    _writer(small_cache.root, small_cache.backend).close()  # the refused writer released the lock


@pytest.mark.parametrize("backend", ["parquet"])  # the check compares manifests; the backend plays no part
@pytest.mark.parametrize("change, key", [
    (lambda m: setattr(m, "backend", "zarr" if m.backend == "parquet" else "parquet"), "backend"),
    (lambda m: m.teacher.update(name="another-teacher"), "teacher.name"),
    (lambda m: m.tokenizer.update(vocab_size=65), "tokenizer.vocab_size"),
    (lambda m: m.build.update(temperature=2.0), "build.temperature"),
    (lambda m: m.fields.pop("loss_mask"), "fields.loss_mask"),
], ids=["backend", "teacher", "vocab", "temperature", "fields"])
def test_reopening_with_other_settings_is_refused_naming_the_first_difference(small_cache, change, key):
    fields = rich_fields()
    m = make_manifest(small_cache.backend, fields, VOCAB, DRAWS)
    change(m)
    with pytest.raises(CacheError, match=f"other settings \\({key}: "):
        CacheWriter(small_cache.root, m, 20)


def test_overwrite_replaces_a_cache_built_with_other_settings(small_cache):
    fields = default_fields(4)
    seqs = make_sequences([6, 6], fields)
    m = write_cache(small_cache.root, small_cache.backend, [("train", s) for s in seqs], fields, overwrite=True)
    assert m.top_k == 4 and m.totals()["sequences"] == 2
    assert sorted(os.listdir(small_cache.root)) == [".lock", "README.md", "manifest.json", "shards"]
    assert os.listdir(small_cache.root / "shards") == [f"train-00000.{small_cache.backend}"]
    assert open_cache(small_cache.root).manifest.top_k == 4
    assert verify_cache(str(small_cache.root)) == []


def test_a_second_writer_on_the_same_directory_is_refused_while_the_first_is_open(tmp_path, backend):
    first = _writer(tmp_path / "c", backend)
    try:
        with pytest.raises(CacheError, match="another process is writing this cache"):
            _writer(tmp_path / "c", backend)
    finally:
        first.close()
    _writer(tmp_path / "c", backend).close()


def test_a_non_empty_directory_without_a_manifest_is_refused_and_left_as_it_was(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="is not empty and is not a kdcache cache"):
        _writer(tmp_path / "c", "parquet")
    assert _listing(tmp_path / "c") == ["notes.txt"]
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"


def test_an_existing_empty_directory_is_used(tmp_path):
    (tmp_path / "c").mkdir()
    fields = default_fields(4)
    write_cache(tmp_path / "c", "parquet", [("train", s) for s in make_sequences([5], fields)], fields)
    assert verify_cache(str(tmp_path / "c")) == []


def test_shard_tokens_must_be_positive(tmp_path):
    with pytest.raises(CacheError, match="shard_tokens must be positive"):
        _writer(tmp_path / "c", "parquet", shard_tokens=0)


def test_a_block_that_does_not_match_the_field_table_is_refused_before_anything_is_written(tmp_path):
    fields = rich_fields()
    block = SeqBlock.from_sequences(make_sequences([5], fields), fields)
    block.token["topk_logprobs"] = block.token["topk_logprobs"].astype(np.float16)
    with _writer(tmp_path / "c", "parquet") as w:
        with pytest.raises(CacheError, match="'topk_logprobs' has dtype float16, expected F32"):
            w.write_shard("train", block)
    assert _listing(tmp_path / "c" / "shards") == [] and _manifest(tmp_path / "c")["shards"] == []


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
def test_the_card_exists_and_its_snippet_opens_the_first_shard_without_kdcache(tmp_path, backend, monkeypatch):
    fields = rich_fields()
    seqs = make_sequences([7, 5], fields)
    write_cache(tmp_path / "c", backend, [("train", s) for s in seqs], fields)
    card = (tmp_path / "c" / "README.md").read_text()
    assert "synthetic" in card and "`train`: 2 sequences, 12 tokens, 1 shards" in card
    assert "| `hidden/5` | token | BF16 | [8] |" in card
    assert "fingerprint 0000000000000000 |" in card  # the manifest's corpus.sha256 (the card once read another key)
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert ("import pyarrow.parquet as pq" if backend == "parquet" else "import zarr") in snippet
    monkeypatch.chdir(tmp_path / "c")
    names: dict = {}
    exec(compile(snippet, "README.md", "exec"), names)  # our own generated card, run as a reader would
    if backend == "parquet":
        assert names["table"].num_rows == 2 and names["row"]["input_ids"] == seqs[0]["input_ids"].tolist()
    else:
        assert names["ids"].tolist() == seqs[0]["input_ids"].tolist()


def test_an_output_path_that_cannot_be_a_directory_gives_a_cache_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(CacheError, match="file/c"):
        _writer(tmp_path / "file" / "c", "parquet")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions; see the full-disk test")
def test_a_read_only_output_directory_gives_a_cache_error_and_publishes_no_shard(tmp_path, backend):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(CacheError, match="ro/c: cannot write a cache here"):
            _writer(ro / "c", backend)
        with pytest.raises(CacheError, match="ro: cannot write a cache here"):
            _writer(ro, backend)
    finally:
        ro.chmod(0o755)
    seqs = make_sequences([30], rich_fields())
    with _writer(tmp_path / "c", backend) as w:
        (tmp_path / "c" / "shards").chmod(0o555)
        try:
            with pytest.raises(CacheError, match="could not write shard"):
                w.add("train", seqs[0])
        finally:
            (tmp_path / "c" / "shards").chmod(0o755)
    assert _listing(tmp_path / "c" / "shards") == [] and _manifest(tmp_path / "c")["shards"] == []


def test_a_full_disk_while_writing_a_shard_gives_a_cache_error_and_publishes_no_shard(tmp_path, backend):
    # RLIMIT_FSIZE makes any write past 4 KiB fail with EFBIG, as a full disk fails with ENOSPC.
    seqs = make_sequences([200, 30], rich_fields())
    root = tmp_path / "c"
    w = _writer(root, backend, shard_tokens=100)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limit[1]))
    try:
        with pytest.raises(CacheError, match=f"shards/train-00000.{backend}: could not write shard"):
            w.add("train", seqs[0])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
        w.close()
    assert _listing(root / "shards") == [] and _manifest(root)["shards"] == []
    with _writer(root, backend, shard_tokens=100) as again:  # the same build simply runs again
        for s in seqs:
            again.add("train", s)
        again.finish()
    assert verify_cache(str(root)) == []


def test_a_full_disk_while_writing_the_manifest_gives_a_cache_error_and_the_shard_stays_unpublished(tmp_path):
    # A tiny Zarr shard fits under 4 KiB per file; the manifest naming its ~30 files does not.
    seqs = make_sequences([3, 3], rich_fields())
    root = tmp_path / "c"
    w = _writer(root, "zarr", shard_tokens=3)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limit[1]))
    try:
        with pytest.raises(CacheError, match="manifest.json: could not publish shard shards/train-00000.zarr"):
            w.add("train", seqs[0])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
        w.close()
    assert w.manifest.shards == [] and _manifest(root)["shards"] == []
    with _writer(root, "zarr", shard_tokens=3) as again:
        assert again.done_sequences("train") == 0
        for s in seqs:
            again.add("train", s)
        again.finish()
    assert verify_cache(str(root)) == []


def test_a_damaged_manifest_in_the_output_is_refused_and_the_lock_released(tmp_path, backend):
    root = tmp_path / "c"
    root.mkdir()
    (root / "manifest.json").write_text('{"format": "kdcache", "format_version": "1.0.0"')
    with pytest.raises(CacheError, match="not valid JSON") as refused:
        _writer(root, backend)
    # In the same process, while the error (and the refused writer in its traceback) is still alive:
    with _writer(root, backend, overwrite=True) as w:
        w.finish()
    assert refused.value is not None
    assert verify_cache(str(root)) == []
