"""Checkpoints that resume exactly and hold no pickle.

A checkpoint is a folder `OUT/checkpoints/step-NNNNNNN/`:
    model.safetensors      student (+ hidden projector) parameters
    optimizer.safetensors  optimizer tensors, flattened to names; the rest of its state is in state.json
    state.json             step, loader resume state, scheduler state, settings, RNG state (as lists of ints)
It is written under a temporary name and renamed; `OUT/checkpoints/latest` names the newest one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from formats.errors import KdError
from formats.manifest import atomic_write_bytes, fsync_dir
from student_trainer.errors import write_failure


class CheckpointError(KdError):
    """A checkpoint is missing, damaged or from other settings."""


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        meta["state"][str(pid)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
                meta["state"][str(pid)][key] = "tensor"
            else:
                meta["state"][str(pid)][key] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for pid, entries in meta["state"].items():
        state[int(pid)] = {k: (tensors[f"{pid}.{k}"] if v == "tensor" else v) for k, v in entries.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(out: Path, step: int, model: torch.nn.Module, optimizer, extra: dict) -> Path:
    """Write checkpoint `step` under a temporary name and rename it into place. A write that fails (a full disk) is
    a CheckpointError naming the checkpoint; the temporary folder is removed and the previous checkpoint stays the
    latest."""
    root = Path(out) / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_checkpoint(tmp, step, model, optimizer, extra)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        fsync_dir(root)
        atomic_write_bytes(root / "latest", final.name.encode())
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{final}: could not write the checkpoint ({write_failure(e)}); no temporary files "
                              "are left and the latest checkpoint is unchanged") from None
    return final


def _write_checkpoint(folder: Path, step: int, model: torch.nn.Module, optimizer, extra: dict) -> None:
    save_model(model, str(folder / "model.safetensors"))
    tensors, meta = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(folder / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        rng["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    state = dict(extra, step=step, optimizer=meta, rng=rng)
    (folder / "state.json").write_text(json.dumps(state))
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def latest_checkpoint(out: Path) -> Path | None:
    pointer = Path(out) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which is missing")
    return path


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer) -> dict:
    """Restore parameters, optimizer and RNG; returns the rest of state.json (step, loader, settings...)."""
    try:
        load_model(model, str(path / "model.safetensors"))
        state = json.loads((path / "state.json").read_text())
        optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), state["optimizer"]))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot be restored ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["rng"]["cuda"]])
    return state
