"""The teacher's Hugging Face folder, as both backends read it: checked, fingerprinted, its config described."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig

from cache_builder.errors import BuildError
from formats.teacher_identity import fingerprint_weights
FINGERPRINT_METHOD = "config + name, size, first and last 4 MiB of each weight file"


def check_teacher_folder(path: str) -> None:
    folder = Path(path)
    if not folder.is_dir():
        raise BuildError(f"teacher {path!r}: no such folder (give an HF model folder or 'default')")
    if not (folder / "config.json").exists():
        raise BuildError(f"teacher {path!r}: no config.json; not a Hugging Face model folder")
    if not any(p.suffix in (".safetensors", ".bin") for p in folder.iterdir()):
        raise BuildError(f"teacher {path!r}: no weight files (*.safetensors or *.bin)")


def read_config(path: str, trust_remote_code: bool):
    """The folder's transformers config (the whole model's, e.g. with a vision tower beside the text model)."""
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise BuildError(f"teacher {path!r}: config.json cannot be read ({str(e).splitlines()[0]})") from None


def num_text_layers(config) -> int:
    return int(_text_config(config).num_hidden_layers)


def describe_folder(path: str, name: str, *, trust_remote_code: bool, dtype: str, device: str, backend: str,
                    backend_version: str) -> dict:
    """The manifest's `teacher` section as both backends write it (a backend may add keys after these)."""
    config = read_config(path, trust_remote_code)
    cfg = _text_config(config)
    return {
        "name": name,
        "path": str(Path(path).resolve()),
        "fingerprint": fingerprint_weights(path),
        "fingerprint_method": FINGERPRINT_METHOD,
        "dtype": dtype,
        "device_type": device.split(":")[0],
        "backend": backend,
        "backend_version": backend_version,
        "architecture": (getattr(config, "architectures", None) or [config.model_type])[0],
        "num_layers": int(cfg.num_hidden_layers),
        "hidden_size": int(cfg.hidden_size),
        "model_vocab_size": int(cfg.vocab_size),
    }


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config
