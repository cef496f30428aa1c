"""The transformers backend: any AutoModelForCausalLM folder, on CPU or GPU.

A batch of sequences is right-padded and run once; each sequence's valid positions then go through
`capture.capture_rows` on the device, so only the compact records (top-k, tail, target, samples, the
chosen hidden layers) ever leave it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache_builder.capture import CaptureSettings, capture_rows, to_numpy
from cache_builder.dtypes import resolve_dtype, torch_dtype
from cache_builder.errors import BuildError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def fingerprint_weights(folder: str | os.PathLike) -> str:
    """sha256 over config.json and every weight file's name, size and first and last 4 MiB.

    Hashing every byte of a 140 GB teacher takes many minutes; this fingerprint changes whenever a file
    is replaced, resized or re-quantized, and is recorded as such in the manifest (fingerprint_method).
    """
    folder = Path(folder)
    h = hashlib.sha256()
    cfg = folder / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    for path in sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        size = path.stat().st_size
        h.update(f"{path.name}\t{size}\n".encode())
        with open(path, "rb") as f:
            h.update(f.read(4 << 20))
            if size > 8 << 20:
                f.seek(size - (4 << 20))
                h.update(f.read())
    return h.hexdigest()


def check_teacher_folder(path: str) -> None:
    folder = Path(path)
    if not folder.is_dir():
        raise BuildError(f"teacher {path!r}: no such folder (give an HF model folder or 'default')")
    if not (folder / "config.json").exists():
        raise BuildError(f"teacher {path!r}: no config.json; not a Hugging Face model folder")
    if not any(p.suffix in (".safetensors", ".bin") for p in folder.iterdir()):
        raise BuildError(f"teacher {path!r}: no weight files (*.safetensors or *.bin)")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def describe_teacher(path: str, name: str, settings) -> dict:
    """The manifest's `teacher` section, from the folder alone (no weights loaded)."""
    import torch
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as e:
        raise BuildError(f"teacher {path!r}: config.json cannot be read ({str(e).splitlines()[0]})") from None
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    device = resolve_device(settings.device)
    return {
        "name": name,
        "path": str(Path(path).resolve()),
        "fingerprint": fingerprint_weights(path),
        "fingerprint_method": "config + name, size, first and last 4 MiB of each weight file",
        "dtype": resolve_dtype(settings.dtype, device),
        "device_type": device.split(":")[0],
        "backend": "hf",
        "backend_version": f"transformers {transformers.__version__}, torch {torch.__version__}",
        "architecture": (getattr(config, "architectures", None) or [config.model_type])[0],
        "num_layers": int(cfg.num_hidden_layers),
        "hidden_size": int(cfg.hidden_size),
        "model_vocab_size": int(cfg.vocab_size),
    }


@dataclass
class HFTeacher:
    model: object
    device: str


def load_hf_teacher(path: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False) -> HFTeacher:
    import torch
    from transformers import AutoModelForCausalLM

    check_teacher_folder(path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise BuildError(f"teacher {path!r}: cannot be loaded by transformers ({str(e).splitlines()[0]})") from None
    model.to(device).eval()
    return HFTeacher(model=model, device=device)


def load_runner(path: str, name: str, settings):
    """The builder's view of this backend: a function from a batch of rows to their records."""
    teacher = load_hf_teacher(path, settings.dtype, settings.device, settings.trust_remote_code)

    def run(batch, cs: CaptureSettings, layers: list[int], hidden_dtype: str) -> list[dict[str, np.ndarray]]:
        return forward_records(teacher, [j.ids for j in batch], [j.seed for j in batch], cs, layers, hidden_dtype,
                               [j.next_id for j in batch])

    return run


def normalize_layers(layers: list[int], num_layers: int) -> list[int]:
    """HF hidden_states indices (0 = embeddings .. num_layers = final, after the norm); negatives count
    from the end. Returns sorted distinct non-negative indices."""
    out = set()
    for layer in layers:
        idx = layer + num_layers + 1 if layer < 0 else layer
        if not 0 <= idx <= num_layers:
            raise BuildError(
                f"--hidden-layers: layer {layer} is out of range for a teacher with {num_layers} layers "
                f"(valid: {-(num_layers + 1)} .. {num_layers})"
            )
        out.add(idx)
    return sorted(out)


def forward_records(
    teacher: HFTeacher,
    rows: list[np.ndarray],
    seeds: list[int],
    cs: CaptureSettings,
    hidden_layers: list[int],
    hidden_dtype: str,
    next_after: list[int] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Run one padded batch and return, per row, the stored fields of its positions.

    rows: token ids of each row (int32 (T_j,)); seeds: one RS-KD seed per row; next_after: the token
    that follows each row (a packed sequence's next document), -1 or None when unknown: the last
    position's target is then NaN.
    """
    import torch

    device = teacher.device
    lengths = [len(r) for r in rows]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.from_numpy(r.astype(np.int64))
        mask[j, : len(r)] = 1
    ids, mask = ids.to(device), mask.to(device)
    hid_dtype = torch_dtype(hidden_dtype) if hidden_layers else None
    with torch.inference_mode():
        out = teacher.model(input_ids=ids, attention_mask=mask, output_hidden_states=bool(hidden_layers), use_cache=False)
        records = []
        for j, n in enumerate(lengths):
            next_ids = torch.full((n,), -1, dtype=torch.long, device=device)
            next_ids[: n - 1] = ids[j, 1:n]
            if next_after is not None:
                next_ids[n - 1] = next_after[j]
            gen = None
            if cs.sample_draws:
                gen = torch.Generator(device=device)
                gen.manual_seed(seeds[j])
            rec = {name: to_numpy(t) for name, t in capture_rows(out.logits[j, :n], next_ids, cs, gen).items()}
            for layer in hidden_layers:
                rec[f"hidden/{layer}"] = to_numpy(out.hidden_states[layer][j, :n].to(hid_dtype))
            records.append(rec)
    return records
