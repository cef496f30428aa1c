"""`kdcache verify`: every value invariant, every kind of file damage, and the traversal/safety refusals
(SPEC.md, Fields / Layout / Notes).

A value defect is written into a sequence *before* CacheWriter publishes it, so every checksum is
consistent and only the value check can catch it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from formats.errors import CacheError
from formats.reader import open_cache
from formats.verify import verify_cache
from tests.formats.synth import (
    DRAWS,
    VOCAB,
    edit_manifest,
    make_sequences,
    rich_fields,
    write_cache,
)

R = 3  # the token row of sequence 2 that a defect is written into


def _unhit(seq: dict, r: int = R) -> None:
    """Make input_ids[r+1] an id outside topk_ids[r], so the target-vs-top-k check has nothing to compare at r."""
    seq["input_ids"][r + 1] = next(i for i in range(VOCAB) if i not in seq["topk_ids"][r])


def _samples(seq: dict, ids: list[int], counts: list[int], r: int = R) -> None:
    """Set row r of sample_ids/sample_counts, padding the rest of the 4 slots with -1 / 0."""
    seq["sample_ids"][r] = ids + [-1] * (4 - len(ids))
    seq["sample_counts"][r] = counts + [0] * (4 - len(counts))


def _lp_above_zero(seq: dict) -> None:
    # A row whose mass is still 1 within F32 tolerance, so only the sign check can fire.
    _unhit(seq)
    seq["topk_logprobs"][R] = [1e-5] + [-100.0] * 7
    seq["tail_logmass"][R] = -np.inf


def _swap_first_two(seq: dict) -> None:
    # ids and log-probs swapped together: pairs stay consistent, only the order along k is wrong.
    assert seq["topk_logprobs"][R, 0] > seq["topk_logprobs"][R, 1]
    for name in ("topk_ids", "topk_logprobs"):
        seq[name][R, [0, 1]] = seq[name][R, [1, 0]]


def _target_disagrees(seq: dict) -> None:
    seq["input_ids"][R + 1] = seq["topk_ids"][R, 2]
    seq["target_logprob"][R] = seq["topk_logprobs"][R, 2] - 0.5


def _repeat_topk_id(seq: dict) -> None:
    _unhit(seq)
    seq["topk_ids"][R, 1] = seq["topk_ids"][R, 0]


def _jump_position(seq: dict) -> None:
    seq["position_ids"][R] += 5


def _positions_from_1(seq: dict) -> None:
    seq["position_ids"][:] = np.arange(1, len(seq["position_ids"]) + 1)


def _negative_doc_index(seq: dict) -> None:
    seq["doc_index"] = np.int64(-1)


def _empty(seq: dict) -> None:
    for name in list(seq):
        if name != "doc_index":
            seq[name] = seq[name][:0]


def _set(name: str, index, value, unhit: bool = False):
    def mutate(seq: dict) -> None:
        if unhit:
            _unhit(seq)
        seq[name][index] = value
    return mutate


MASS = ("tail_logmass", "top-k mass + tail differs from 1")
DEFECTS = {
    # name: (mutation of sequence 2, [(field named or None, text of the problem)])
    "input_id_at_vocab": (_set("input_ids", R, VOCAB), [("input_ids", "ids outside [0, 64)")]),
    "input_id_negative": (_set("input_ids", R, -1), [("input_ids", "ids outside [0, 64)")]),
    "topk_id_at_vocab": (_set("topk_ids", (R, 5), VOCAB, unhit=True), [("topk_ids", "ids outside [0, 64)")]),
    "topk_id_negative": (_set("topk_ids", (R, 5), -3, unhit=True), [("topk_ids", "ids outside [0, 64)")]),
    "topk_id_repeated": (_repeat_topk_id, [("topk_ids", "repeated id in one row")]),
    "logprob_above_0": (_lp_above_zero, [("topk_logprobs", "log-prob above 0")]),
    "logprob_nan": (_set("topk_logprobs", (R, 7), np.nan, unhit=True), [("topk_logprobs", "NaN"), MASS]),
    "logprobs_increasing": (_swap_first_two, [("topk_logprobs", "not non-increasing along k")]),
    "mass_plus_tail_not_1": (_set("tail_logmass", R, 0.0), [MASS]),
    "tail_nan": (_set("tail_logmass", R, np.nan), [("tail_logmass", "NaN or above 0"), MASS]),
    "tail_above_0": (_set("tail_logmass", R, 0.5), [("tail_logmass", "NaN or above 0"), MASS]),
    "target_not_nan_at_last": (_set("target_logprob", -1, -1.0),
                               [("target_logprob", "not NaN at the last position of a sequence")]),
    "target_nan_before_last": (_set("target_logprob", R, np.nan), [("target_logprob", "NaN before the last position")]),
    "target_above_0": (_set("target_logprob", R, 0.5, unhit=True), [("target_logprob", "log-prob above 0")]),
    "target_disagrees_with_topk": (_target_disagrees,
                                   [("target_logprob", "disagrees with the top-k entry of the next token")]),
    "counts_do_not_sum_to_n": (lambda s: _samples(s, [5, 6], [DRAWS - 1, 2]),
                               [("sample_counts", f"counts do not sum to {DRAWS} draws")]),
    "padding_with_count": (lambda s: _samples(s, [5], [DRAWS - 1, 1]),
                           [("sample_counts", "padding with a non-zero count")]),
    "sampled_id_with_count_0": (lambda s: _samples(s, [5, 6], [DRAWS, 0]),
                                [("sample_counts", "a sampled id with count 0")]),
    "sample_id_repeated": (lambda s: _samples(s, [5, 5], [DRAWS - 1, 1]), [("sample_ids", "repeated id in one row")]),
    "sample_id_at_vocab": (lambda s: _samples(s, [VOCAB], [DRAWS]), [("sample_ids", "ids outside [0, 64)")]),
    "sample_id_negative_not_padding": (lambda s: _samples(s, [-2], [DRAWS]), [("sample_ids", "not padding -1")]),
    "loss_mask_2": (_set("loss_mask", R, 2), [("loss_mask", "values other than 0 and 1")]),
    "position_id_jump": (_jump_position, [("position_ids", "neither 0 nor one more than the previous position")]),
    "position_id_not_0_at_start": (_positions_from_1,
                                   [("position_ids", "neither 0 nor one more than the previous position")]),
    "byte_offsets_end_before_start": (_set("byte_offsets", R, [5, 3]), [("byte_offsets", "start < 0 or end < start")]),
    "byte_offsets_negative_start": (_set("byte_offsets", R, [-1, 0]), [("byte_offsets", "start < 0 or end < start")]),
    "hidden_f16_inf": (_set("hidden/2", (R, 0), np.inf), [("hidden/2", "non-finite values")]),
    "hidden_f16_nan": (_set("hidden/2", (R, 7), np.nan), [("hidden/2", "non-finite values")]),
    "hidden_bf16_inf": (_set("hidden/5", (R, 0), 0x7F80), [("hidden/5", "non-finite values")]),
    "hidden_bf16_nan": (_set("hidden/5", (R, 3), 0xFFC1), [("hidden/5", "non-finite values")]),
    "doc_index_negative": (_negative_doc_index, [("doc_index", "negative document index")]),
    "empty_sequence": (_empty, [(None, "sequence 0 is empty")]),
}
ZARR_DEFECTS = ("topk_id_at_vocab", "logprob_nan", "hidden_bf16_inf", "target_not_nan_at_last", "empty_sequence",
                "padding_with_count", "sampled_id_with_count_0")
# Parquet stores RS-KD samples without their padding slots, so its writer refuses rows whose padding is out of place.
PADDING_DEFECTS = ("padding_with_count", "sampled_id_with_count_0")


def _defective_cache(root: Path, backend: str, mutate) -> None:
    """Four train sequences of 10 tokens in two shards; sequence 2 (first of shard 1) carries the defect."""
    fields = rich_fields()
    seqs = make_sequences([10, 10, 10, 10], fields, seed=1)
    if mutate is not None:
        mutate(seqs[2])
    write_cache(root, backend, [("train", s) for s in seqs], fields, shard_tokens=20)


@pytest.mark.parametrize("defect", PADDING_DEFECTS)
def test_the_parquet_writer_refuses_sample_padding_out_of_place(tmp_path, defect):
    with pytest.raises(CacheError, match=r"row \d+: padding \(id -1, count 0\) must follow the drawn ids"):
        _defective_cache(tmp_path / "c", "parquet", DEFECTS[defect][0])


@pytest.mark.parametrize("backend, defect", [("parquet", d) for d in DEFECTS if d not in PADDING_DEFECTS]
                         + [("zarr", d) for d in ZARR_DEFECTS])
def test_a_value_defect_is_reported_once_naming_its_shard_and_field(tmp_path, backend, defect):
    mutate, expected = DEFECTS[defect]
    _defective_cache(tmp_path / "c", backend, mutate)
    problems = verify_cache(str(tmp_path / "c"))
    assert len(problems) == len(expected), problems
    shard = f"shards/train-00001.{backend}"
    for field, text in expected:
        named = f"shard {shard!r} field {field}: " if field else f"shard {shard!r}: "
        assert sum(named in p and text in p for p in problems) == 1, (named, text, problems)


def test_the_defect_free_cache_of_the_defect_tests_reports_no_problems(tmp_path, backend):
    _defective_cache(tmp_path / "c", backend, None)
    assert verify_cache(str(tmp_path / "c")) == []


def test_a_clean_cache_reports_no_problems_with_or_without_checksums(small_cache):
    assert verify_cache(str(small_cache.root)) == []
    assert verify_cache(str(small_cache.root), checksums=False) == []


def test_a_problem_names_the_first_bad_token_row_and_counts_the_bad_rows(tmp_path):
    def two_bad_rows(seq):
        seq["loss_mask"][[4, 7]] = 3

    _defective_cache(tmp_path / "c", "parquet", two_bad_rows)
    (problem,) = verify_cache(str(tmp_path / "c"))
    assert problem.endswith("field loss_mask: values other than 0 and 1 (2 rows, first at token 4)")


# ---- file damage: checksums, sizes, missing and unknown files, manifest counts ----

def _first_data_file(cache) -> Path:
    entry = cache.manifest.shards[0]
    if cache.backend == "parquet":
        return cache.root / entry.path
    return cache.root / entry.path / "input_ids" / "c" / "0"


def _file_name(cache) -> str:
    return "shards/train-00000.parquet" if cache.backend == "parquet" else "input_ids/c/0"


def _only_problem(root: Path) -> str:
    problems = verify_cache(str(root))
    assert len(problems) == 1, problems
    return problems[0]


def test_a_flipped_byte_in_a_shard_file_is_reported_by_verify(small_cache):
    path = _first_data_file(small_cache)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(data)
    problem = _only_problem(small_cache.root)
    shard = small_cache.manifest.shards[0].path
    assert f"shard {shard!r}: file {_file_name(small_cache)!r} sha256 mismatch" in problem


def test_a_truncated_shard_file_is_reported_with_both_sizes(small_cache):
    path = _first_data_file(small_cache)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 7)
    problem = _only_problem(small_cache.root)
    assert f"file {_file_name(small_cache)!r} has {size - 7} bytes, the manifest says {size}" in problem
    with pytest.raises(CacheError, match=f"has {size - 7} bytes, the manifest says {size}"):
        open_cache(small_cache.root).check_structure()


def test_a_missing_shard_is_reported_by_verify_and_refused_by_the_reader(small_cache):
    entry = small_cache.manifest.shards[1]
    path = small_cache.root / entry.path
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    problems = verify_cache(str(small_cache.root))
    assert problems and len(problems) == len(entry.files)
    assert all(f"shard {entry.path!r}: file " in p and "is missing" in p for p in problems)
    cache = open_cache(small_cache.root)
    with pytest.raises(CacheError, match=f"shard {entry.path!r} is missing"):
        cache.read_shard(entry)
    with pytest.raises(CacheError, match="is missing file"):
        cache.check_structure()


@pytest.mark.parametrize("extra, message", [
    ("notes.txt", "unknown extra file 'notes.txt' (not named by the manifest)"),
    (".manifest.json.tmp-123", "unknown extra file '.manifest.json.tmp-123'"),
    ("shards/train-00009.EXT", "unknown extra file 'shards/train-00009.EXT'"),
    ("junk/", "unknown extra directory 'junk'"),
])
def test_an_unknown_file_in_the_cache_is_reported(small_cache, extra, message):
    ext = small_cache.backend
    path = small_cache.root / extra.replace("EXT", ext)
    path.mkdir() if extra.endswith("/") else path.write_bytes(b"x")
    assert message.replace("EXT", ext) in _only_problem(small_cache.root)


def test_an_unknown_file_inside_a_zarr_group_is_reported(tmp_path):
    fields = rich_fields()
    seqs = make_sequences([10, 10], fields)
    write_cache(tmp_path / "c", "zarr", [("train", s) for s in seqs], fields, shard_tokens=100)
    (tmp_path / "c" / "shards" / "train-00000.zarr" / "input_ids" / "c" / "1").write_bytes(b"\0" * 16)
    problem = _only_problem(tmp_path / "c")
    assert "shard 'shards/train-00000.zarr': unknown extra file 'input_ids/c/1' in the shard" in problem


@pytest.mark.parametrize("edit, message", [
    (lambda o: o["totals"].update(tokens=o["totals"]["tokens"] + 5), "totals"),
    (lambda o: o["totals"].update(sequences=99), "totals"),
    (lambda o: o["splits"]["train"].update(shards=1), "splits"),
], ids=["total_tokens", "total_sequences", "split_shards"])
def test_a_manifest_whose_totals_disagree_with_its_shards_is_reported(small_cache, edit, message):
    edit_manifest(small_cache.root, edit)
    problem = _only_problem(small_cache.root)
    assert re.search(rf"{message} .* disagree with the shard list", problem)


def _bump(key: str, by: int = 1):
    """Change one count of shard 0 and keep splits/totals consistent, so only the shard itself can disagree."""
    def edit(o):
        o["shards"][0][key] += by
        o["splits"]["train"][key] += by
        o["totals"][key] += by
    return edit


@pytest.mark.parametrize("key", ["tokens", "sequences"])
def test_a_shard_whose_manifest_counts_disagree_with_its_files_is_reported(small_cache, key):
    edit_manifest(small_cache.root, _bump(key))
    problem = _only_problem(small_cache.root)
    shard = small_cache.manifest.shards[0]
    assert f"shard {shard.path!r}" in problem
    if small_cache.backend == "parquet":
        have = shard.tokens if key == "tokens" else shard.sequences
        assert f"holds {have} {key}, the manifest says {have + 1}" in problem
    else:  # the zarr reader compares array shapes with the manifest before reading data
        assert "has shape" in problem and "manifest says" in problem


def test_a_content_checksum_that_does_not_match_the_arrays_is_reported(small_cache):
    edit_manifest(small_cache.root, lambda o: o["shards"][2].update(content_sha256="ab" * 32))
    problem = _only_problem(small_cache.root)
    assert f"shard 'shards/heldout-00000.{small_cache.backend}': content checksum differs from the manifest" in problem


# ---- traversal and safety ----

@pytest.mark.parametrize("path", [
    "../outside.parquet",
    "shards/../../outside.parquet",
    "/etc/passwd",
    "s3://other/x.parquet",
    "file:///etc/passwd",
    "shards\\train-00000.parquet",
    "shards//train-00000.parquet",
    "./shards/train-00000.parquet",
    "~/x.parquet",
])
def test_a_manifest_shard_path_leaving_the_cache_is_refused_naming_the_path(small_cache, path):
    edit_manifest(small_cache.root, lambda o: o["shards"][0].update(path=path))
    with pytest.raises(CacheError) as e:
        open_cache(small_cache.root)
    assert repr(path) in str(e.value)
    problem = _only_problem(small_cache.root)
    assert repr(path) in problem


def test_a_zarr_file_entry_leaving_the_shard_is_refused_naming_the_path(tmp_path):
    fields = rich_fields()
    write_cache(tmp_path / "c", "zarr", [("train", s) for s in make_sequences([10], fields)], fields)
    edit_manifest(tmp_path / "c", lambda o: o["shards"][0]["files"][0].update(path="../../../etc/passwd"))
    with pytest.raises(CacheError, match=re.escape("'../../../etc/passwd'")):
        open_cache(tmp_path / "c")


def _move_out(src: Path, outside: Path) -> None:
    """Replace `src` with a symlink to an identical copy outside the cache (checksums still match)."""
    shutil.move(src, outside)
    src.symlink_to(outside, target_is_directory=outside.is_dir())


def _assert_refused_as_outside(cache_dir: Path) -> None:
    cache = open_cache(cache_dir)  # the manifest itself is fine
    entry = cache.shards()[0]
    with pytest.raises(CacheError, match="resolves outside the cache") as e:
        cache.read_shard(entry)
    assert repr(entry.path) in str(e.value)
    with pytest.raises(CacheError, match="resolves outside the cache"):
        list(cache.iter_blocks())
    with pytest.raises(CacheError, match="resolves outside the cache"):
        cache.sequence(0, "train")
    problems = verify_cache(str(cache_dir))
    assert problems and all("resolves outside the cache" in p for p in problems)
    assert any(repr(entry.path) in p for p in problems)


def test_a_shard_symlinked_out_of_the_cache_is_refused_by_reader_and_verify(small_cache, tmp_path):
    _move_out(small_cache.root / small_cache.manifest.shards[0].path, tmp_path / "elsewhere")
    _assert_refused_as_outside(small_cache.root)


def test_a_shards_folder_symlinked_out_of_the_cache_is_refused_by_reader_and_verify(small_cache, tmp_path):
    _move_out(small_cache.root / "shards", tmp_path / "elsewhere")
    _assert_refused_as_outside(small_cache.root)


@pytest.mark.parametrize("backend", ["zarr"])
def test_a_zarr_array_file_symlinked_out_of_the_cache_is_refused_by_reader_and_verify(small_cache, tmp_path):
    shard = small_cache.root / small_cache.manifest.shards[0].path
    _move_out(shard / "input_ids" / "c" / "0", tmp_path / "elsewhere")
    _assert_refused_as_outside(small_cache.root)


def test_a_symlink_that_stays_inside_the_cache_is_read(tmp_path):
    fields = rich_fields()
    seqs = make_sequences([10], fields)
    root = tmp_path / "c"
    write_cache(root, "parquet", [("train", s) for s in seqs], fields)
    (root / "shards" / "real").mkdir()
    os.rename(root / "shards" / "train-00000.parquet", root / "shards" / "real" / "t.parquet")
    (root / "shards" / "train-00000.parquet").symlink_to("real/t.parquet")
    cache = open_cache(root)
    assert cache.read_shard(cache.shards()[0]).num_tokens == 10


def test_no_module_of_the_format_can_unpickle_or_evaluate_cache_content():
    sources = sorted(Path(__file__).parents[2].joinpath("formats").glob("*.py"))
    assert len(sources) >= 10
    forbidden = re.compile(r"\bpickle\b|allow_pickle\s*=\s*True|\beval\(|\bexec\(|\bmarshal\b|torch\.load|yaml\.load\(")
    offenders = [f"{p.name}:{i}: {line.strip()}" for p in sources
                 for i, line in enumerate(p.read_text().splitlines(), 1) if forbidden.search(line)]
    assert offenders == []


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
def test_a_samples_only_cache_must_keep_all_mass_in_the_tail(tmp_path, backend):
    fields = rich_fields(k=0)
    seqs = make_sequences([10, 10], fields, seed=2)
    write_cache(tmp_path / "ok", backend, [("train", s) for s in seqs], fields)
    assert verify_cache(str(tmp_path / "ok")) == []
    seqs[1]["tail_logmass"][R] = -0.5  # a tail of 0.61 with no top-k left: the row's mass is not 1
    write_cache(tmp_path / "bad", backend, [("train", s) for s in seqs], fields)
    problems = verify_cache(str(tmp_path / "bad"))
    assert len(problems) == 1 and "field tail_logmass: top-k mass + tail differs from 1" in problems[0], problems
