"""The training recipe in-process on the tiny teacher's cache: settings, schedules and phases, students derived from
the teacher, tokenizer checks, loss paths, and the teacher's own eval. Whole runs: test_train_end_to_end.py;
schedules, phases and the learning rate: test_schedule.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from formats.reader import open_cache
from student_trainer.collate import collate
from student_trainer.errors import TrainError
from student_trainer.evaluate import evaluate
from student_trainer.hidden_align import HiddenProjector
from student_trainer.kd_mix import KDConfig
from student_trainer.schedule import ScheduleError
from student_trainer.settings import TrainSettings, load_settings
from student_trainer.student import student_from_teacher, uniform_layers
from student_trainer.train import DistillModel, train
from tests.cache_builder.tiny_teacher import TOKENIZER_FILES, make_tiny_teacher

METRIC_KEYS = {"split", "positions", "kl_to_teacher", "top1_agreement", "top5_overlap", "ce", "perplexity", "ece", "bpb",
               "aligned_fraction"}


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def settings(tiny_cache: str, out: Path, **kw) -> TrainSettings:
    base = dict(cache=tiny_cache, out=str(out), steps=2, batch_size=2, num_workers=0, checkpoint_every=0, progress=False)
    base.update(kw)
    return TrainSettings(**base)


# ------------------------------------------------------------------------------------------- settings


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "train.yaml"
    path.write_text("cache: c\nout: o\nstudent: s\n" + text)
    return str(path)


def test_yaml_settings_are_read_and_command_line_overrides_win(tmp_path):
    config = write_config(tmp_path, "steps: 5\nlr: 0.001\nbetas: [0.8, 0.9]\n"
                                    "alpha: {kind: linear, start: 1.0, end: 0.0, steps: 10}\n"
                                    "phases: [{name: features, steps: 2, kd_weight: 0, hidden_weight: 1}]\n")
    s = load_settings(config, {"steps": 9, "lr": None, "batch_size": 3})  # None: the flag was not given
    assert (s.steps, s.lr, s.batch_size, s.betas) == (9, 0.001, 3, (0.8, 0.9))
    assert s.alpha == {"kind": "linear", "start": 1.0, "end": 0.0, "steps": 10}
    assert s.phases[0]["name"] == "features" and s.cache == "c"


@pytest.mark.parametrize("text, message", [
    ("learning_rate: 0.1\n", r"unknown key 'learning_rate' \(did you mean 'lr'\?\)"),
    ("temprature: 2.0\n", r"unknown key 'temprature' \(did you mean 'temperature'\?\)"),
    ("batch-size: 4\n", r"unknown key 'batch-size' \(did you mean 'batch_size'\?\)"),
    ("phases: [{steps: 3, kd_wieght: 0}]\n", r"phases\[0\]: unknown keys \['kd_wieght'\]"),
    ("alpha: {kind: linear, start: 1, end: 0, stpes: 5}\n", r"schedule 'alpha' \(linear\): needs keys"),
])
def test_an_unknown_or_misspelled_key_is_an_error_naming_it(tmp_path, text, message):
    with pytest.raises((TrainError, ScheduleError), match=message):
        load_settings(write_config(tmp_path, text), {})


@pytest.mark.parametrize("key, value", [
    ("steps", "10"), ("steps", 2.5), ("lr", "fast"), ("resume", 1), ("progress", "no"), ("betas", 0.9),
    ("phases", {"steps": 3}), ("layer_map", 3),
    ("lr", {"kind": "constant", "value": 0.1}), ("weight_decay", {"kind": "constant", "value": 0.1}),  # not schedulable
])
def test_a_value_of_the_wrong_type_is_an_error_naming_the_key(key, value):
    base = {"cache": "c", "out": "o", "student": "s"}
    with pytest.raises(TrainError, match=rf"{key} must be"):
        load_settings(None, {**base, key: value})


@pytest.mark.parametrize("change, message", [
    ({"kd_kind": "kl"}, "kd_kind must be one of"),
    ({"hidden_metric": "l1"}, "hidden_metric must be one of mse, cosine, got .l1."),
    ({"steps": 0}, "steps must be positive"),
    ({"temperature": {"kind": "cosine", "start": 2.0}}, r"schedule 'temperature' \(cosine\): needs keys"),
    ({"alpha": {"kind": "step", "values": [1, 0], "boundaries": [5, 9]}}, "one more value than boundaries"),
    ({"phases": [{"name": "a"}]}, r"phases\[0\]: needs a positive integer 'steps'"),
    ({"student": ""}, "give either --student"),
])
def test_bad_settings_are_refused_before_training_with_one_clear_error(change, message):
    with pytest.raises((TrainError, ScheduleError), match=message):
        load_settings(None, {"cache": "c", "out": "o", "student": "s", **change})


def test_the_train_command_reports_a_bad_config_on_one_line_with_exit_status_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kdcache.cli", "train", "--config",
                           write_config(tmp_path, "learnig_rate: 0.1\n"), "--steps", "3"], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdcache train: error:") and "'learnig_rate'" in lines[0]


# ------------------------------------------------------------------------------------------- students


def test_a_student_with_all_teacher_layers_equals_the_teacher(tiny_teacher):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    student, _, info = student_from_teacher(str(tiny_teacher), teacher.config.num_hidden_layers)
    ids = torch.randint(0, 49152, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(student.eval()(input_ids=ids).logits, teacher(input_ids=ids).logits)
    assert info["copied_layers"] == [0, 1]


def test_a_student_with_fewer_layers_copies_the_evenly_spread_teacher_layers(tmp_path, tokenizer_dir):
    assert uniform_layers(5, 3) == [0, 2, 4] and uniform_layers(30, 4) == [0, 10, 19, 29] and uniform_layers(5, 1) == [4]
    folder = make_tiny_teacher(tmp_path / "teacher5", tokenizer_dir, layers=5)
    teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    student, _, info = student_from_teacher(str(folder), 3)
    assert info["copied_layers"] == [0, 2, 4] and student.config.num_hidden_layers == 3
    for name, tensor in student.state_dict().items():
        parts = name.split(".")
        if "layers" in parts:
            i = parts.index("layers") + 1
            parts[i] = str([0, 2, 4][int(parts[i])])
        assert torch.equal(tensor, teacher[".".join(parts)]), name


def test_a_derived_student_keeps_the_attention_types_of_the_layers_it_copies(tmp_path, tokenizer_dir):
    folder = tmp_path / "teacher"
    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=1,
                         num_key_value_heads=1, use_sliding_window=True, sliding_window=16,
                         layer_types=["full_attention", "sliding_attention", "full_attention"])
    Qwen2ForCausalLM(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, folder / name)
    student, _, info = student_from_teacher(str(folder), 2)
    assert info["copied_layers"] == [0, 2]
    assert student.config.layer_types == ["full_attention", "full_attention"]


def test_a_student_whose_tokenizer_differs_from_the_caches_is_refused(tiny_teacher, tiny_cache, tmp_path):
    folder = Path(shutil.copytree(tiny_teacher, tmp_path / "student"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["<kdcache-extra-token>"])
    tokenizer.save_pretrained(folder)
    with pytest.raises(TrainError, match=r"student tokenizer .*49153 tokens.* differs from the cache's \(49152 tokens"):
        train(settings(tiny_cache, tmp_path / "out", student=str(folder)))


def test_a_student_with_fewer_output_rows_than_the_cache_vocabulary_is_refused(tokenizer_dir, tiny_cache, tmp_path):
    folder = tmp_path / "small-vocab"
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, folder / name)
    with pytest.raises(TrainError, match=r"student has 1000 output rows, fewer than the cache's vocabulary \(49152\)"):
        train(settings(tiny_cache, tmp_path / "out", student=str(folder)))


# ------------------------------------------------------------------------------------------- loss paths


def test_a_feature_phase_trains_only_the_hidden_projector_path(tiny_teacher, tiny_cache, tmp_path):
    out = tmp_path / "out"
    s = settings(tiny_cache, out, steps=3, student_layers=2, init_from_teacher=str(tiny_teacher), layer_map="uniform",
                 warmup_steps=1, lr=1e-3, phases=[{"name": "features", "steps": 3, "kd_weight": 0, "hidden_weight": 1}])
    train(s)
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert all(m["phase"] == "features" and "kd_mix" not in m and m["loss"] == m["hidden"] > 0 for m in lines)
    final, teacher = load_file(out / "final" / "model.safetensors"), load_file(tiny_teacher / "model.safetensors")
    assert torch.equal(final["lm_head.weight"], teacher["lm_head.weight"]), "the output head got a gradient"
    assert not torch.equal(final["model.layers.0.mlp.up_proj.weight"], teacher["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("kind", ["fkl_ghost", "rskd", "jsd"])
def test_a_filler_batch_gives_zero_loss_and_zero_gradients_on_every_loss_path(tiny_teacher, tiny_cache, kind):
    m = open_cache(tiny_cache).manifest
    student, _, _ = student_from_teacher(str(tiny_teacher), 2)
    model = DistillModel(student, HiddenProjector({1: 1, 2: 2}, 128, 128), m.vocab_size, chunk_tokens=256)
    filler = collate([], [1, 2], fields=m.fields)
    loss, parts = model(filler, KDConfig(kind=kind, alpha=0.5, vocab_size=m.vocab_size), 1.0, 1.0)
    loss.backward()
    assert float(loss.detach()) == 0.0 and parts == {"kd_mix": 0.0, "hidden": 0.0}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)


@pytest.mark.parametrize("which", ["tiny_cache", "packed_cache"])
def test_the_teacher_scores_zero_kl_and_full_agreement_on_its_own_cache(tiny_teacher, request, which):
    """On the packed cache this also proves attention never crosses a packed document boundary."""
    result = evaluate(str(tiny_teacher), request.getfixturevalue(which), "heldout", batch_size=4, device="cpu")
    assert set(result) == METRIC_KEYS and result["positions"] > 100
    assert abs(result["kl_to_teacher"]) < 1e-4
    assert result["top1_agreement"] == 1.0 and result["top5_overlap"] == 1.0
