"""The builder's dtype names in one table: the command line's, the cache format's (formats/SPEC.md) and torch's.

This module does not import torch: `settings.py` takes its choices from here, and `kdcache --help` must not
pay for torch. The functions below import it when called, by which time a build has loaded it anyway.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

# (command-line name, format name, torch name) of every dtype the builder stores or computes in.
DTYPES = (("fp32", "F32", "float32"), ("fp16", "F16", "float16"), ("bf16", "BF16", "bfloat16"))
TORCH_NAMES = {fmt: torch_name for _, fmt, torch_name in DTYPES}  # format name -> torch name

LOGPROB_DTYPES = {cli: fmt for cli, fmt, _ in DTYPES}  # --logprob-dtype -> format name
HIDDEN_DTYPES = {cli: fmt for cli, fmt, _ in DTYPES if fmt != "F32"}  # --hidden-dtype -> format name
# --dtype, the teacher's compute dtype, by torch name (auto: see `resolve_dtype`).
COMPUTE_DTYPES = ("auto", *(TORCH_NAMES[fmt] for fmt in ("F32", "BF16", "F16")))
# x86 CPU flags (/proc/cpuinfo) of native bf16 arithmetic, which torch's CPU kernels (oneDNN) use.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@cache
def torch_dtype(name: str):
    """The torch dtype of a format name ("BF16") or a compute dtype name ("bfloat16")."""
    import torch  # see the module docstring

    torch_name = TORCH_NAMES.get(name, name)
    if torch_name not in TORCH_NAMES.values():
        raise ValueError(f"unknown dtype {name!r}")
    return getattr(torch, torch_name)


def resolve_dtype(dtype: str, device: str) -> str:
    """The teacher's compute dtype by torch name: `dtype` itself, or for 'auto' bfloat16 where the hardware computes
    in it natively (a GPU with bf16; a CPU with AMX-BF16 or AVX512-BF16, where it runs a teacher several times
    faster than float32: benchmarks/RESULTS.md, "Transformers builder"), float32 elsewhere."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        import torch  # see the module docstring

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device == "cpu" and cpu_has_bf16() else "float32"


@cache
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has native bf16 arithmetic (x86 flags amx_bf16 or avx512_bf16). False where /proc/cpuinfo
    is missing (not Linux) or lists neither."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(flag in flags for flag in BF16_CPU_FLAGS)
