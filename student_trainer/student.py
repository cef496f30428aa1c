"""The student model: any HF causal-LM folder, or one derived from the teacher with fewer layers; the device it
runs on; the Hugging Face folder a run publishes."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from safetensors import SafetensorError
from transformers.utils import logging as hf_logging

from formats.errors import KdError
from student_trainer.errors import write_failure


class StudentError(KdError):
    """The student cannot be built or does not fit the cache."""


def resolve_device(name: str) -> torch.device:
    """The device a setting names: "auto" is the GPU when there is one, else the CPU; anything else as torch
    spells it (cpu, cuda, cuda:1)."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def uniform_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layers to copy: evenly spread, first and last included."""
    if student_layers == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


@contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers draws a 'Loading weights' bar on stderr; kdcache keeps stderr for its one-line errors."""
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_student(path: str, dtype: str = "float32"):
    """(model, tokenizer) of an HF causal-LM folder. No code from the folder runs: trust_remote_code stays off."""
    folder = Path(path)
    if not (folder / "config.json").exists():
        raise StudentError(f"student {path!r}: no config.json; give a Hugging Face model folder")
    try:
        # trust_remote_code=False, not left to transformers' default: that one asks on a terminal instead of refusing.
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise StudentError(f"student {path!r}: cannot be loaded ({str(e).splitlines()[0]})") from None
    return model, tokenizer


def student_from_teacher(teacher_dir: str, layers: int, hidden: int | None = None, dtype: str = "float32", seed: int = 0):
    """A smaller student with the teacher's architecture and tokenizer.

    With the teacher's hidden size, embeddings, final norm, output head and an evenly spread subset of
    `layers` decoder layers are copied from the teacher; with another hidden size nothing fits, so the
    student starts from random weights (seeded) and only the config is derived.
    """
    if not (Path(teacher_dir) / "config.json").exists():
        raise StudentError(f"--init-from-teacher {str(teacher_dir)!r}: no config.json; give the teacher's Hugging Face folder")
    try:
        config = AutoConfig.from_pretrained(teacher_dir, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise StudentError(f"--init-from-teacher {str(teacher_dir)!r}: cannot be read ({str(e).splitlines()[0]})") from None
    n_teacher = config.num_hidden_layers
    if not 1 <= layers <= n_teacher:
        raise StudentError(f"--student-layers must be in [1, {n_teacher}] for this teacher, got {layers}")
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir, trust_remote_code=False)
    same_width = hidden is None or hidden == config.hidden_size
    config.num_hidden_layers = layers
    if not same_width:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if hidden % head_dim:
            raise StudentError(f"--student-hidden {hidden} must be a multiple of the head size {head_dim}")
        ratio = hidden / config.hidden_size
        config.num_attention_heads = hidden // head_dim
        config.num_key_value_heads = max(1, min(config.num_attention_heads, round(config.num_key_value_heads * ratio)))
        while config.num_attention_heads % config.num_key_value_heads:
            config.num_key_value_heads -= 1
        config.intermediate_size = int(round(config.intermediate_size * ratio / 64)) * 64 or 64
        config.hidden_size = hidden
    if getattr(config, "layer_types", None) is not None:  # e.g. sliding/full attention: the copied layers' own types
        config.layer_types = [config.layer_types[i] for i in uniform_layers(n_teacher, layers)]
    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    if same_width:
        with quiet_loading():
            teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=getattr(torch, dtype), trust_remote_code=False)
        t_sd = teacher.state_dict()
        picked = uniform_layers(n_teacher, layers)
        new_sd = {}
        for name in student.state_dict():
            src = name
            parts = name.split(".")
            if "layers" in parts:
                i = parts.index("layers") + 1
                parts[i] = str(picked[int(parts[i])])
                src = ".".join(parts)
            new_sd[name] = t_sd[src]
        student.load_state_dict(new_sd)
        del teacher
    return student, tokenizer, {"teacher_dir": str(teacher_dir), "layers": layers, "hidden": config.hidden_size,
                                "copied_layers": uniform_layers(n_teacher, layers) if same_width else []}


def save_student(folder: Path, model, tokenizer, info: dict) -> None:
    """Publish `model` and `tokenizer` as a Hugging Face folder (safetensors) with `info` in kdcache_student.json:
    written under a temporary name and renamed, so `folder` is whole or absent. A failed write (a full disk) is a
    StudentError and leaves no temporary folder."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "kdcache_student.json").write_text(json.dumps(info, indent=1))
        shutil.rmtree(folder, ignore_errors=True)  # the previous final folder of this same run
        os.rename(tmp, folder)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StudentError(f"{folder}: could not write the student ({write_failure(e)}); no temporary files are "
                           "left") from None
