"""The builder's dtype names in one table: the command line's, the cache format's (formats/SPEC.md) and torch's.

This module does not import torch: `settings.py` takes its choices from here, and `kdcache --help` must not
pay for torch. The functions below import it when called, by which time a build has loaded it anyway.
"""

from __future__ import annotations

from functools import cache

# (command-line name, format name, torch name) of every dtype the builder stores or computes in.
DTYPES = (("fp32", "F32", "float32"), ("fp16", "F16", "float16"), ("bf16", "BF16", "bfloat16"))
TORCH_NAMES = {fmt: torch_name for _, fmt, torch_name in DTYPES}  # format name -> torch name

LOGPROB_DTYPES = {cli: fmt for cli, fmt, _ in DTYPES}  # --logprob-dtype -> format name
HIDDEN_DTYPES = {cli: fmt for cli, fmt, _ in DTYPES if fmt != "F32"}  # --hidden-dtype -> format name
# --dtype, the teacher's compute dtype, by torch name (auto: fp32 on CPU, bf16 on GPU; listed in that order).
COMPUTE_DTYPES = ("auto", *(TORCH_NAMES[fmt] for fmt in ("F32", "BF16", "F16")))


@cache
def torch_dtype(name: str):
    """The torch dtype of a format name ("BF16") or a compute dtype name ("bfloat16")."""
    import torch  # see the module docstring

    torch_name = TORCH_NAMES.get(name, name)
    if torch_name not in TORCH_NAMES.values():
        raise ValueError(f"unknown dtype {name!r}")
    return getattr(torch, torch_name)


def resolve_dtype(dtype: str, device: str) -> str:
    """The teacher's compute dtype by torch name: `dtype` itself, or for 'auto' float32 on CPU and bfloat16 on
    GPU (float16 on a GPU without bf16)."""
    if dtype != "auto":
        return dtype
    if not device.startswith("cuda"):
        return "float32"
    import torch  # see the module docstring

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
