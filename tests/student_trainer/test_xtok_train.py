"""A student with its own tokenizer (a BPE trained here on the corpus, a small Llama) distilled from the tiny teacher's
cache through the real trainer and evaluated in bits per byte; and the one-line refusals around it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmarks.xtok_student import make_bpe_student, train_bpe_tokenizer
from formats.errors import KdError
from formats.reader import open_cache
from student_trainer.errors import AlignError, TrainError
from student_trainer.evaluate import evaluate
from student_trainer.loader import EpochReader, LoaderSettings
from student_trainer.settings import TrainSettings
from student_trainer.train import train
from tests.student_trainer.caches import build

pytestmark = pytest.mark.integration  # whole training runs, as test_train_end_to_end.py


@pytest.fixture(scope="module")
def xtok_cache(tmp_path_factory, tiny_teacher, corpus) -> str:
    """Byte offsets; packed paragraphs, the long ones cut into windows (a window's first offset is not 0)."""
    return build(tiny_teacher, corpus, tmp_path_factory.mktemp("caches") / "xtok", byte_offsets=True, packing=True,
                 txt_split="paragraphs", sample_draws=0, hidden_layers=[], top_k=8)


@pytest.fixture(scope="module")
def bpe_student(tmp_path_factory, corpus) -> Path:
    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.txt"))]
    return make_bpe_student(tmp_path_factory.mktemp("students") / "bpe", train_bpe_tokenizer(texts, 600), layers=2, hidden=64)


def settings(cache: str, out: Path, **kw) -> TrainSettings:
    base = dict(cache=cache, out=str(out), steps=2, batch_size=4, num_workers=0, checkpoint_every=0, progress=False,
                warmup_steps=1, lr=3e-3, device="cpu")
    base.update(kw)
    return TrainSettings(**base)


def test_the_cache_has_windows_and_packed_documents(xtok_cache):
    blocks = [open_cache(xtok_cache).open_shard(e).read_range(0, e.sequences) for e in open_cache(xtok_cache).shards()]
    offsets = np.concatenate([b.token["byte_offsets"] for b in blocks])
    positions = np.concatenate([b.token["position_ids"] for b in blocks])
    starts = offsets[positions == 0, 0]
    assert (starts > 0).any() and (starts == 0).any()  # some documents start mid-text: windows
    assert max((b.token["position_ids"] == 0).sum() / len(b) for b in blocks) > 1  # several documents a sequence


@pytest.mark.parametrize("kind", ["byte_align", "uld"])
def test_a_student_with_another_tokenizer_learns_from_the_cache_in_bits_per_byte(xtok_cache, bpe_student, tmp_path, kind):
    before = evaluate(str(bpe_student), xtok_cache, "heldout", device="cpu")
    r = train(settings(xtok_cache, tmp_path / "run", student=str(bpe_student), kd_kind=kind, alpha=0.5, steps=12))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) and 0.3 < m["aligned_fraction"] <= 1 for m in lines)  # a 600-token BPE: short tokens
    after = evaluate(str(tmp_path / "run" / "final"), xtok_cache, "heldout", device="cpu")
    assert after["bpb"] < 0.97 * before["bpb"], (before["bpb"], after["bpb"])
    assert math.isclose(after["bpb"] * math.log(2) * after["positions"] / after["ce"],
                        before["bpb"] * math.log(2) * before["positions"] / before["ce"])  # the same bytes counted
    assert after["kl_to_teacher"] is None and 0.3 < after["aligned_fraction"] <= 1
    assert r["tokens"] > 0 and (tmp_path / "run" / "final" / "tokenizer.json").exists()


def test_bits_per_byte_count_the_stored_bytes_of_the_predicted_tokens(xtok_cache, tiny_teacher):
    result = evaluate(str(tiny_teacher), xtok_cache, "heldout", device="cpu")
    covered = 0  # the stored byte span of every predicted token (position i predicts token i + 1)
    for batch in EpochReader(xtok_cache, "heldout", LoaderSettings(batch_size=8, num_workers=0)).batches(0):
        spans = batch.byte_offsets[:, 1:]  # (B, T - 1, 2): tokens 1..
        covered += int((spans[..., 1] - spans[..., 0])[batch.kd_mask[:, :-1]].sum())
    assert math.isclose(result["bpb"], result["ce"] * result["positions"] / (math.log(2) * covered), rel_tol=1e-9)
    assert result["aligned_fraction"] is None and result["kl_to_teacher"] is not None


def test_a_teacher_tokenizer_aligned_with_itself_pairs_nearly_every_position(xtok_cache, tiny_teacher, tmp_path):
    r = train(settings(xtok_cache, tmp_path / "run", student_layers=1, init_from_teacher=str(tiny_teacher),
                       kd_kind="byte_align", steps=2))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["aligned_fraction"] > 0.97 for m in lines), lines  # only windows re-tokenized at a cut differ
    assert r["steps"] == 2


@pytest.mark.parametrize("case, message", [
    ("no_offsets", r"has no byte offsets; rebuild it with --byte-offsets"),
    ("same_tokenizer_kind", r"differs from the cache's .*use kd_kind uld or byte_align \(a cache built with --byte-offsets\)"),
    ("teacher_tokenizer_missing", r"--teacher-tokenizer '/nonexistent' is not a folder: give --teacher-tokenizer DIR"),
    ("wrong_teacher_tokenizer", r"is not the one that built .*give the teacher's own with --teacher-tokenizer DIR"),
    ("layer_map", r"layer_map: hidden-state alignment needs the teacher's positions"),
])
def test_cross_tokenizer_training_refuses_what_it_cannot_use_in_one_line(tiny_cache, xtok_cache, bpe_student, tmp_path,
                                                                         case, message):
    kw = {"no_offsets": dict(cache=tiny_cache, kd_kind="byte_align"),
          "same_tokenizer_kind": dict(kd_kind="fkl_ghost"),
          "teacher_tokenizer_missing": dict(kd_kind="uld", teacher_tokenizer="/nonexistent"),
          "wrong_teacher_tokenizer": dict(kd_kind="uld", teacher_tokenizer=str(bpe_student)),
          "layer_map": dict(kd_kind="uld", layer_map="1:1")}[case]
    s = settings(kw.pop("cache", xtok_cache), tmp_path / "run", student=str(bpe_student), **kw)
    with pytest.raises(KdError, match=message) as e:
        train(s)
    assert "\n" not in str(e.value) and not (tmp_path / "run" / "final").exists()


def test_a_cache_whose_teacher_folder_is_gone_needs_the_teacher_tokenizer_flag(xtok_cache, tiny_teacher, bpe_student,
                                                                               tmp_path):
    moved = Path(shutil.copytree(xtok_cache, tmp_path / "moved"))  # the cache travels; its teacher does not
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["teacher"]["path"] = "/elsewhere/teacher"
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AlignError, match=r"the teacher folder the cache names \('/elsewhere/teacher'\) is not on this"):
        train(settings(str(moved), tmp_path / "a", student=str(bpe_student), kd_kind="uld"))
    assert train(settings(str(moved), tmp_path / "b", student=str(bpe_student), kd_kind="uld",
                          teacher_tokenizer=str(tiny_teacher)))["steps"] == 2


def test_eval_refuses_a_student_with_another_tokenizer_on_a_cache_without_offsets(tiny_cache, bpe_student):
    with pytest.raises(TrainError, match=r"only a cache built with --byte-offsets can evaluate a student with another"):
        evaluate(str(bpe_student), tiny_cache, "heldout", device="cpu")


def test_in_training_evaluation_of_a_cross_tokenizer_run_equals_eval_of_its_final_student(xtok_cache, bpe_student,
                                                                                        tmp_path):
    train(settings(xtok_cache, tmp_path / "run", student=str(bpe_student), kd_kind="byte_align", alpha=0.5, steps=4,
                   eval_every=2, eval_split="heldout"))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [m for m in lines if "eval_bpb" in m]
    assert [m["step"] for m in evaluated] == [2, 4]
    assert evaluated[0]["eval_bpb"] != evaluated[1]["eval_bpb"]  # the student moved between the two
    final = evaluate(str(tmp_path / "run" / "final"), xtok_cache, "heldout", batch_size=4, device="cpu")
    last = evaluated[-1]
    # The same student on the same positions, in bits per byte of the same stored bytes; only the batch order of
    # the float32 sums differs.
    assert math.isclose(last["eval_bpb"], final["bpb"], rel_tol=1e-6)
    assert math.isclose(last["eval_aligned_fraction"], final["aligned_fraction"], rel_tol=1e-9)
    assert last["eval_kl_to_teacher"] is None
