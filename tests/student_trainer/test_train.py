"""The training recipe in-process on the tiny teacher's cache: settings, schedules and phases, students derived from
the teacher, tokenizer checks, loss paths, and the teacher's own eval. Whole runs: test_train_end_to_end.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from formats.reader import open_cache
from student_trainer.loader import collate
from student_trainer.schedule import ScheduleError, value_at
from student_trainer.student import student_from_teacher, uniform_layers
from student_trainer.train import DistillModel, TrainError, TrainSettings, _lr_factor, _weights, load_settings, train

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
    ({"hidden_metric": "l1"}, "hidden_metric must be mse or cosine"),
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
    proc = subprocess.run([sys.executable, "-m", "formats.cli", "train", "--config",
                           write_config(tmp_path, "learnig_rate: 0.1\n"), "--steps", "3"], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdcache train: error:") and "'learnig_rate'" in lines[0]


# ------------------------------------------------------------------------------------------- schedules


LINEAR = {"kind": "linear", "start": 1.0, "end": 0.1, "steps": 10}
COSINE = {"kind": "cosine", "start": 1.0, "end": 0.0, "steps": 10}
STEP = {"kind": "step", "values": [1.0, 0.5, 0.1], "boundaries": [100, 200]}
WARMUP = {"kind": "warmup", "value": 2.0, "steps": 4}


@pytest.mark.parametrize("spec, step, expected", [
    (0.5, 7, 0.5), ({"kind": "constant", "value": 0.25}, 1000, 0.25),
    (LINEAR, 0, 1.0), (LINEAR, 5, 0.55), (LINEAR, 10, 0.1), (LINEAR, 50, 0.1),
    (COSINE, 0, 1.0), (COSINE, 5, 0.5), (COSINE, 10, 0.0), (COSINE, 30, 0.0),
    (STEP, 0, 1.0), (STEP, 99, 1.0), (STEP, 100, 0.5), (STEP, 199, 0.5), (STEP, 200, 0.1),
    (WARMUP, 0, 0.5), (WARMUP, 2, 1.5), (WARMUP, 3, 2.0), (WARMUP, 40, 2.0),
])
def test_schedules_give_their_values_at_given_steps(spec, step, expected):
    assert value_at(spec, step) == pytest.approx(expected)


def test_phases_switch_the_weights_and_their_schedules_count_from_the_phase_start():
    s = TrainSettings(cache="c", out="o", student="s", alpha={"kind": "linear", "start": 1.0, "end": 0.0, "steps": 100},
                      phases=[{"name": "features", "steps": 10, "kd_weight": 0, "hidden_weight": 1},
                              {"name": "soft", "steps": 20, "temperature": {"kind": "linear", "start": 4.0, "end": 1.0,
                                                                            "steps": 10}},
                              {"name": "joint", "steps": 5}])
    s.validate()
    at = {step: _weights(s, step) for step in (0, 9, 10, 15, 30, 1000)}
    assert at[0] == {"phase": "features", "alpha": 1.0, "temperature": 1.0, "kd_weight": 0.0, "hidden_weight": 1.0}
    assert at[9]["phase"] == "features" and at[9]["alpha"] == pytest.approx(0.91)  # global schedules count globally
    assert at[10] == {"phase": "soft", "alpha": pytest.approx(0.9), "temperature": 4.0, "kd_weight": 1.0,
                      "hidden_weight": 0.0}
    assert at[15]["temperature"] == pytest.approx(2.5)  # the phase's schedule starts at the phase's first step
    assert at[30]["phase"] == "joint" and at[30]["temperature"] == 1.0
    assert at[1000]["phase"] == "joint" and at[1000]["alpha"] == 0.0  # the last phase runs on


def test_the_learning_rate_warms_up_linearly_then_decays_by_cosine_to_min_lr_ratio():
    s = TrainSettings(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert [_lr_factor(i, s) for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert [_lr_factor(i, s) for i in (10, 60, 110, 500)] == pytest.approx([1.0, 0.55, 0.1, 0.1])


# ------------------------------------------------------------------------------------------- students


def test_a_student_with_all_teacher_layers_equals_the_teacher(tiny_teacher):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    student, _, info = student_from_teacher(str(tiny_teacher), teacher.config.num_hidden_layers)
    ids = torch.randint(0, 49152, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(student.eval()(input_ids=ids).logits, teacher(input_ids=ids).logits)
    assert info["copied_layers"] == [0, 1]


def test_a_student_with_fewer_layers_copies_the_evenly_spread_teacher_layers(tmp_path, tokenizer_dir):
    from tiny_teacher import make_tiny_teacher
    from transformers import AutoModelForCausalLM

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
    from tiny_teacher import TOKENIZER_FILES
    from transformers import Qwen2Config, Qwen2ForCausalLM

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
    from transformers import AutoTokenizer

    folder = Path(shutil.copytree(tiny_teacher, tmp_path / "student"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["<kdcache-extra-token>"])
    tokenizer.save_pretrained(folder)
    with pytest.raises(TrainError, match=r"student tokenizer .*49153 tokens.* differs from the cache's \(49152 tokens"):
        train(settings(tiny_cache, tmp_path / "out", student=str(folder)))


def test_a_student_with_fewer_output_rows_than_the_cache_vocabulary_is_refused(tokenizer_dir, tiny_cache, tmp_path):
    from tiny_teacher import TOKENIZER_FILES
    from transformers import LlamaConfig, LlamaForCausalLM

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
    from student_trainer.losses import HiddenProjector, KDConfig

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
    from student_trainer.evaluate import evaluate

    result = evaluate(str(tiny_teacher), request.getfixturevalue(which), "heldout", batch_size=4, device="cpu")
    assert set(result) == METRIC_KEYS and result["positions"] > 100
    assert abs(result["kl_to_teacher"]) < 1e-4
    assert result["top1_agreement"] == 1.0 and result["top5_overlap"] == 1.0
