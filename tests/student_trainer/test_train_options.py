"""The trainer's optional paths, each run for real on the tiny teacher's cache on CPU: TensorBoard and W&B
logging (offline), bf16 autocast, gradient checkpointing, LoRA adapters (peft) and torch.compile."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from student_trainer.reporting import ReportError
from student_trainer.settings import TrainSettings, load_settings
from student_trainer.student import student_from_teacher
from student_trainer.train import train


def settings(tiny_cache: str, tiny_teacher: Path, out: Path, **kw) -> TrainSettings:
    base = dict(cache=tiny_cache, out=str(out), steps=3, batch_size=2, num_workers=0, checkpoint_every=0, progress=False,
                student_layers=1, init_from_teacher=str(tiny_teacher), lr=1e-3, warmup_steps=1, seed=0)
    base.update(kw)
    return TrainSettings(**base)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_gets_every_logged_step_and_a_resume_replaces_the_redone_steps(tiny_teacher, tiny_cache, tmp_path):
    out = tmp_path / "out"
    train(settings(tiny_cache, tiny_teacher, out, steps=4, checkpoint_every=2, report_to="tensorboard"))
    first = tensorboard_scalars(out / "tensorboard", "train/loss")
    assert [s for s, _ in first] == [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    assert [v for _, v in first] == pytest.approx([m["loss"] for m in metrics(out)], rel=1e-6)
    # As if killed after logging step 4 but before its checkpoint landed: the resumed run redoes steps 3 and 4.
    shutil.rmtree(out / "checkpoints" / "step-0000004")
    (out / "checkpoints" / "latest").write_text("step-0000002")
    train(settings(tiny_cache, tiny_teacher, out, steps=4, checkpoint_every=2, report_to="tensorboard", resume=True))
    again = tensorboard_scalars(out / "tensorboard", "train/loss")
    assert [step for step, _ in again] == [1, 2, 3, 4], "redone steps were logged twice"
    assert [v for _, v in again] == pytest.approx([v for _, v in first], rel=1e-6)


def test_wandb_offline_run_gets_the_metrics_and_a_resume_continues_the_same_run(tiny_teacher, tiny_cache, tmp_path,
                                                                                 monkeypatch):
    pytest.importorskip("wandb")  # installed by the dev extra; W&B stays optional for users
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    train(settings(tiny_cache, tiny_teacher, out, steps=2, checkpoint_every=1, report_to="wandb", run_name="t"))
    run_id = (out / "wandb_run_id").read_text()
    logged = wandb_losses(out, run_id)  # history rows, then the run summary repeats the last values
    assert {m["loss"] for m in metrics(out)} <= set(logged) and logged[-1] == metrics(out)[-1]["loss"]
    train(settings(tiny_cache, tiny_teacher, out, steps=3, checkpoint_every=1, report_to="wandb", resume=True))
    assert (out / "wandb_run_id").read_text() == run_id, "the resumed run started a new W&B run"
    assert wandb_losses(out, run_id)[-1] == metrics(out)[-1]["loss"]


def wandb_losses(out: Path, run_id: str) -> list[float]:
    """train/loss values of the offline run's record files. wandb 0.31 ships no reader for them; a history item
    is a protobuf message holding the key, then field 16 (bytes 0x82 0x01) with the value as JSON text."""
    values = []
    for path in sorted((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        for m in re.finditer(rb"\ntrain/loss\x82\x01(.)", path.read_bytes(), re.S):
            values.append(float(path.read_bytes()[m.end(): m.end() + m.group(1)[0]]))
    return values


def test_an_unknown_metrics_sink_is_refused_by_name(tmp_path):
    with pytest.raises(ReportError, match="unknown sink 'tensorbord'"):
        load_settings(None, {"cache": "c", "out": "o", "student": "s", "report_to": "tensorbord"})


def test_bf16_autocast_trains_on_cpu_close_to_fp32(tiny_teacher, tiny_cache, tmp_path):
    fp32 = metrics_of(train(settings(tiny_cache, tiny_teacher, tmp_path / "fp32", precision="fp32")))
    bf16 = metrics_of(train(settings(tiny_cache, tiny_teacher, tmp_path / "bf16", precision="bf16")))
    assert bf16[0]["loss"] != fp32[0]["loss"], "bf16 autocast did not change the arithmetic"
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=0.02)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in bf16)


def metrics_of(summary: dict) -> list[dict]:
    return metrics(Path(summary["out"]))


def test_gradient_checkpointing_gives_the_same_losses_and_parameters(tiny_teacher, tiny_cache, tmp_path):
    plain = train(settings(tiny_cache, tiny_teacher, tmp_path / "plain", precision="fp32"))
    ckpt = train(settings(tiny_cache, tiny_teacher, tmp_path / "ckpt", precision="fp32", grad_checkpointing=True))
    assert [m["loss"] for m in metrics_of(ckpt)] == pytest.approx([m["loss"] for m in metrics_of(plain)], rel=1e-5)
    for (name, a), (_, b) in zip(plain["model"].named_parameters(), ckpt["model"].named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_lora_trains_low_rank_updates_only_and_saves_a_merged_folder_transformers_loads(tiny_teacher, tiny_cache, tmp_path):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    train(settings(tiny_cache, tiny_teacher, out, lora_rank=2, lr=1e-2))
    merged = load_file(out / "final" / "model.safetensors")
    assert not any("lora" in k for k in merged), "adapters were saved unmerged"
    before = student_from_teacher(str(tiny_teacher), 1, seed=0)[0].state_dict()
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(merged[name], before[name]), f"LoRA changed the frozen {name}"
    delta = merged["model.layers.0.self_attn.q_proj.weight"] - before["model.layers.0.self_attn.q_proj.weight"]
    assert 0 < torch.linalg.matrix_rank(delta, rtol=1e-4) <= 2, "the update is not a rank-2 adapter"
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.num_hidden_layers == 1


@pytest.mark.integration
def test_torch_compile_trains_to_the_same_losses_as_eager(tiny_teacher, tiny_cache, tmp_path):
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    # Two steps: the second step's loss shows the compiled backward gave the eager gradients.
    eager = train(settings(tiny_cache, tiny_teacher, tmp_path / "eager", steps=2, precision="fp32"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = train(settings(tiny_cache, tiny_teacher, tmp_path / "compiled", steps=2, precision="fp32", compile=True))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    assert [m["loss"] for m in metrics_of(compiled)] == pytest.approx([m["loss"] for m in metrics_of(eager)], rel=1e-4)
    assert load_file(tmp_path / "compiled" / "final" / "model.safetensors").keys() == \
        load_file(tmp_path / "eager" / "final" / "model.safetensors").keys()
