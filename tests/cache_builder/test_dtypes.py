"""cache_builder.dtypes: what `--dtype auto` resolves to, and that the manifest records the resolved dtype."""

from __future__ import annotations

from pathlib import Path

import pytest

from cache_builder import dtypes
from cache_builder.dtypes import cpu_has_bf16, resolve_dtype
from cache_builder.settings import BuildSettings
from cache_builder.teacher_hf import HFTeacher
from cache_builder.teacher_vllm import VllmTeacher

XEON = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\nprocessor\t: 1\nflags\t\t: fpu\n"
EPYC_ZEN3 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"


@pytest.mark.parametrize("text, native", [(XEON, True), (ZEN4, True), (EPYC_ZEN3, False)])
def test_bf16_is_native_on_cpus_listing_amx_or_avx512_bf16(tmp_path: Path, text, native):
    (tmp_path / "cpuinfo").write_text(text)
    assert cpu_has_bf16(str(tmp_path / "cpuinfo")) is native


def test_a_cpu_without_cpuinfo_is_taken_as_without_bf16(tmp_path: Path):
    assert cpu_has_bf16(str(tmp_path / "no-such-file")) is False


@pytest.mark.parametrize("native, want", [(True, "bfloat16"), (False, "float32")])
def test_auto_on_cpu_is_bf16_where_native_else_fp32(monkeypatch, native, want):
    monkeypatch.setattr(dtypes, "cpu_has_bf16", lambda: native)
    assert resolve_dtype("auto", "cpu") == want
    assert resolve_dtype("float32", "cpu") == "float32" and resolve_dtype("bfloat16", "cpu") == "bfloat16"


def test_both_backends_record_the_resolved_dtype_not_auto(tiny_teacher: Path):
    want = resolve_dtype("auto", "cpu")
    assert HFTeacher(str(tiny_teacher), "t", device="cpu").describe()["dtype"] == want
    pytest.importorskip("vllm")
    s = BuildSettings(teacher=str(tiny_teacher), corpus=[], out="", backend="vllm")
    assert VllmTeacher(str(tiny_teacher), "t", s).describe()["dtype"] == want
