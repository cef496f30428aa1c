"""The vLLM backend writes what the transformers backend writes: the same rows through a real vLLM engine
(CPU build, no mock) and through `teacher_hf`, compared field by field.

Thresholds (from the issue): top-k ids identical on >= 99% of positions, log-probs within 2e-3, tail
mass within 1e-3, hidden states within 1e-3 relative. One SmolLM2 engine serves every test here (it
starts once, ~30-90 s on 2 cores); the end-to-end build starts its own engine on the tiny teacher.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from cache_builder.build import run_build
from cache_builder.capture import CaptureSettings
from cache_builder.errors import BuildError
from cache_builder.settings import BuildSettings, VllmOptions
from cache_builder.teacher import Job
from cache_builder.teacher_hf import forward_records, load_hf_teacher
from cache_builder.teacher_vllm import (HookCapture, VllmTeacher, engine_args, logprob_records, shutdown_engine,
                                        start_engine)
from formats.reader import open_cache
from formats.settings import given
from formats.verify import verify_cache
from kdcache.cli import build_parser
from tests.cache_builder.tiny_teacher import make_tiny_teacher

K = 20
STEP_TOKENS = 128  # the engine's max_num_batched_tokens: longer rows are computed over several steps
ENGINE = [pytest.mark.vllm, pytest.mark.integration]


def vllm_settings(teacher: Path, **kw) -> BuildSettings:
    # float32, as the transformers side of every comparison here (--dtype auto is bf16 on CPUs with bf16).
    base = dict(teacher=str(teacher), corpus=[], out="", backend="vllm", top_k=K, seq_len=512, dtype="float32",
                vllm={"kv_cache_gib": 1, "max_num_batched_tokens": STEP_TOKENS})
    base.update(kw)
    return BuildSettings(**base)


@pytest.fixture(scope="session")
def smol_engine(teacher_dir):
    """One eager vLLM engine on SmolLM2 for the session, with max_logprobs=K for the fallback route."""
    pytest.importorskip("vllm")
    s = vllm_settings(teacher_dir)
    llm = start_engine(str(teacher_dir), s, VllmOptions.from_dict(s.vllm), eager=True, max_logprobs=K)
    yield llm
    shutdown_engine(llm)


@pytest.fixture(scope="session")
def hf_smol(teacher_dir):
    return load_hf_teacher(str(teacher_dir), "float32", "cpu")


@pytest.fixture(scope="session")
def jobs(tokenizer) -> list[Job]:
    """Rows from real text: one chunked over three engine steps, a one-token row, and the same row twice
    with a different token after it."""
    text = (Path(os.__file__).parent / "textwrap.py").read_text()
    ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int32)
    long, mid = ids[:300], ids[400:457]
    assert len(long) > 2 * STEP_TOKENS
    return [Job(0, 0, long, int(ids[300]), 11), Job(1, 0, mid, -1, 12), Job(2, 0, ids[500:501], -1, 13),
            Job(3, 0, mid, int(ids[457]), 14)]


def hf_records(hf, jobs, cs, layers, hidden_dtype="F16"):
    return forward_records(hf, [j.ids for j in jobs], [j.seed for j in jobs], cs, layers, hidden_dtype,
                           [j.next_id for j in jobs])


def assert_same_records(got: dict, want: dict, tail_atol: float = 1e-3) -> float:
    """The issue's thresholds; returns the fraction of positions whose top-k ids are identical."""
    same_ids = float((got["topk_ids"] == want["topk_ids"]).all(axis=1).mean())
    assert same_ids >= 0.99, f"top-k ids identical on only {same_ids:.1%} of positions"
    rows = (got["topk_ids"] == want["topk_ids"]).all(axis=1)
    np.testing.assert_allclose(got["topk_logprobs"][rows], want["topk_logprobs"][rows], atol=2e-3, rtol=0)
    np.testing.assert_allclose(got["tail_logmass"], want["tail_logmass"], atol=tail_atol, rtol=0)
    assert np.array_equal(np.isnan(got["target_logprob"]), np.isnan(want["target_logprob"]))
    np.testing.assert_allclose(got["target_logprob"], want["target_logprob"], atol=2e-3, rtol=0, equal_nan=True)
    for name in want:
        if name.startswith("hidden/"):
            a, b = got[name].astype(np.float64), want[name].astype(np.float64)
            assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max(), f"{name} differs"
            assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(b), f"{name} differs"
    return same_ids


@pytest.mark.vllm
@pytest.mark.integration
def test_capture_matches_the_transformers_backend_on_rows_split_over_engine_steps(smol_engine, hf_smol, jobs,
                                                                                   tokenizer):
    cs = CaptureSettings(top_k=K, vocab_size=len(tokenizer), sample_draws=32)
    layers = [0, 15, 30]  # embeddings, a decoder layer's input, the final output (after the norm)
    reported = []
    got = HookCapture(smol_engine).records(jobs, cs, layers, "F16", progress=reported.append)
    want = hf_records(hf_smol, jobs, cs, layers)
    assert sorted(reported) == sorted(len(j.ids) for j in jobs)  # each row once, as the engine finishes it
    for job, g, w in zip(jobs, got, want):
        assert g.keys() == w.keys()
        assert all(len(v) == len(job.ids) for v in g.values())
        assert_same_records(g, w)
        assert (g["sample_counts"].sum(axis=1) == 32).all()
    # The last position: NaN without a next token, else the log-prob of the token after the row.
    assert np.isnan(got[1]["target_logprob"][-1]) and np.isnan(got[2]["target_logprob"][-1])
    assert np.isfinite(got[0]["target_logprob"][-1]) and np.isfinite(got[3]["target_logprob"][-1])
    # The same row twice: the same records (up to the batch position's rounding) but the last target.
    assert (got[1]["topk_ids"] == got[3]["topk_ids"]).all(axis=1).mean() >= 0.99
    np.testing.assert_allclose(got[1]["target_logprob"][:-1], got[3]["target_logprob"][:-1], atol=1e-4)


@pytest.mark.vllm
@pytest.mark.integration
def test_rskd_samples_repeat_for_a_seed_and_follow_the_transformers_backend(smol_engine, hf_smol, jobs, tokenizer):
    cs = CaptureSettings(top_k=K, vocab_size=len(tokenizer), sample_draws=16, sample_slots=16)
    capture = HookCapture(smol_engine)
    first = capture.records(jobs[:2], cs, [], "BF16")
    again = capture.records(jobs[:2], cs, [], "BF16")
    other = capture.records([dataclasses.replace(j, seed=j.seed + 1000) for j in jobs[:2]], cs, [], "BF16")
    for a, b, c in zip(first, again, other):
        assert np.array_equal(a["sample_ids"], b["sample_ids"]) and np.array_equal(a["sample_counts"], b["sample_counts"])
        assert not np.array_equal(a["sample_ids"], c["sample_ids"])
        assert (a["sample_counts"].sum(axis=1) == 16).all() and (c["sample_counts"].sum(axis=1) == 16).all()
    # Same seed, same generator, same chunks as the transformers backend: the draws mostly coincide
    # (a draw can differ where the two log-probs differ in the last bits).
    want = hf_records(hf_smol, jobs[:2], cs, [])
    for a, w in zip(first, want):
        assert (a["sample_ids"] == w["sample_ids"]).mean() > 0.9
    # A samples-only capture (k = 0) draws exactly the same samples and keeps no top-k.
    alone = capture.records(jobs[:2], dataclasses.replace(cs, top_k=0), [], "BF16")
    for a, b in zip(first, alone):
        assert set(b) == {"tail_logmass", "target_logprob", "sample_ids", "sample_counts"} and (b["tail_logmass"] == 0).all()
        assert np.array_equal(a["sample_ids"], b["sample_ids"]) and np.array_equal(a["sample_counts"], b["sample_counts"])


@pytest.mark.vllm
@pytest.mark.integration
def test_prompt_logprobs_fallback_matches_the_transformers_backend(smol_engine, hf_smol, jobs, tokenizer):
    cs = CaptureSettings(top_k=K, vocab_size=len(tokenizer))
    reported = []
    got = logprob_records(smol_engine, jobs, cs, progress=reported.append)
    want = hf_records(hf_smol, jobs, cs, [])
    assert sorted(reported) == sorted(len(j.ids) for j in jobs)  # the row's tokens, not the prompt's (+1 next token)
    for job, g, w in zip(jobs, got, want):
        assert all(len(v) == len(job.ids) for v in g.values())
        # Here the tail is 1 - sum(top k): an error d in the top-k probabilities (~4e-5 between the two
        # engines) becomes d / tail in log space, so the log tail meets 1e-3 only where the tail is large.
        heavy = np.exp(w["tail_logmass"]) > 0.1
        assert heavy.mean() > 0.3
        assert_same_records({**g, "tail_logmass": g["tail_logmass"][heavy]}, {**w, "tail_logmass": w["tail_logmass"][heavy]})
        np.testing.assert_allclose(np.exp(g["tail_logmass"]), np.exp(w["tail_logmass"]), atol=2e-4)
    assert np.isnan(got[1]["target_logprob"][-1]) and np.isfinite(got[0]["target_logprob"][-1])


@pytest.mark.vllm
@pytest.mark.integration
def test_prompt_logprobs_fallback_refuses_ids_past_the_tokenizer_vocabulary(smol_engine, jobs):
    with pytest.raises(BuildError, match="past the tokenizer"):
        logprob_records(smol_engine, jobs[1:2], CaptureSettings(top_k=K, vocab_size=100))


@pytest.mark.vllm
@pytest.mark.integration
def test_vllm_build_equals_the_transformers_build(teacher_dir, tmp_path_factory):
    """`run_build(backend="vllm")` end to end on the tiny teacher (padded vocabulary rows that would win
    every top-k if not dropped), packed documents, RS-KD samples, an intermediate and the final layer."""
    tmp = tmp_path_factory.mktemp("vllm_build")
    tiny = make_tiny_teacher(tmp / "teacher", teacher_dir)
    corpus = tmp / "corpus"
    corpus.mkdir()
    for name in ("colorsys.py", "bisect.py", "keyword.py"):
        (corpus / f"{name}.txt").write_text((Path(os.__file__).parent / name).read_text()[:2500])
    common = dict(teacher=str(tiny), corpus=[str(corpus)], top_k=8, seq_len=256, packing=True, txt_split="paragraphs",
                  sample_draws=16, hidden_layers=[1, -1], hidden_dtype="fp16", shard_tokens=400,
                  max_batch_tokens=512, progress=False, dtype="float32")
    hf = run_build(BuildSettings(out=str(tmp / "hf"), **common))
    vl = run_build(BuildSettings(out=str(tmp / "vllm"), backend="vllm",
                                 vllm={"kv_cache_gib": 1, "max_num_batched_tokens": 96}, **common))
    assert verify_cache(str(tmp / "vllm")) == []
    assert vl.teacher["backend"] == "vllm" and vl.teacher["backend_version"].startswith("vllm ")
    assert vl.fields.keys() == hf.fields.keys()
    a, b = open_cache(tmp / "hf"), open_cache(tmp / "vllm")
    assert a.num_sequences() == b.num_sequences() > 2
    for i in range(a.num_sequences()):
        want, got = a.sequence(i), b.sequence(i)
        assert np.array_equal(got["input_ids"], want["input_ids"])
        assert np.array_equal(got["position_ids"], want["position_ids"])
        assert_same_records(got, want)
        assert (got["sample_counts"].astype(int).sum(axis=1) == 16).all()
        assert (got["topk_ids"] < a.manifest.vocab_size).all()


# --- settings: no engine needed -------------------------------------------------------------------------


def test_the_logprobs_route_refuses_what_it_cannot_capture(teacher_dir):
    for kw, flag in (({"hidden_layers": [-1]}, "--hidden-layers"), ({"sample_draws": 8}, "--sample-draws"),
                     ({"temperature": 2.0}, "--temperature")):
        s = vllm_settings(teacher_dir, vllm={"capture": "logprobs"}, **kw)
        with pytest.raises(BuildError, match=f"{flag}.*--backend hf"):
            VllmTeacher(str(teacher_dir), "t", s).describe()


def test_unknown_or_mistyped_engine_options_are_refused():
    with pytest.raises(BuildError, match="unknown key 'tensor_parallel'"):
        VllmOptions.from_dict({"tensor_parallel": 2})
    with pytest.raises(BuildError, match="max_num_seqs must be an integer or null, got '8'"):
        VllmOptions.from_dict({"max_num_seqs": "8"})
    with pytest.raises(BuildError, match="--vllm-capture"):
        VllmOptions.from_dict({"capture": "pooling"})
    opts = VllmOptions.from_dict({"gpu_memory_utilization": 1})
    assert opts.gpu_memory_utilization == 1


def test_the_manifest_records_the_engine_options_that_change_numerics(teacher_dir):
    info = VllmTeacher(str(teacher_dir), "smol", vllm_settings(teacher_dir, vllm={"kv_cache_dtype": "fp8"})).describe()
    assert info["backend"] == "vllm" and info["backend_version"].startswith("vllm 0.")
    assert (info["dtype"], info["quantization"], info["kv_cache_dtype"], info["capture"]) == (
        "float32", None, "fp8", "hooks")


def test_engine_arguments_follow_the_build_settings(teacher_dir):
    s = vllm_settings(teacher_dir, seq_len=300, seed=7, vllm={"tensor_parallel_size": 2, "max_num_seqs": 8,
                                                              "kv_cache_gib": 1.5})
    kw = engine_args(str(teacher_dir), s, VllmOptions.from_dict(s.vllm), eager=False)
    assert kw["enable_prefix_caching"] is False  # a cached prefix would not be recomputed: missing positions
    assert (kw["tensor_parallel_size"], kw["max_num_seqs"], kw["seed"], kw["max_model_len"]) == (2, 8, 7, 301)
    assert kw["kv_cache_memory_bytes"] == int(1.5 * (1 << 30)) and kw["dtype"] == "float32"
    assert kw["worker_extension_cls"] == "cache_builder.vllm_worker.CaptureExtension"
    with pytest.raises(BuildError, match="--vllm-max-model-len of at least 301"):
        s = vllm_settings(teacher_dir, seq_len=300, vllm={"max_model_len": 300})
        engine_args(str(teacher_dir), s, VllmOptions.from_dict(s.vllm), eager=False)


def test_vllm_flags_with_the_hf_backend_are_refused():
    parser = build_parser()
    base = ["build", "--teacher", "t", "--corpus", "c", "--out", "o"]
    args = parser.parse_args(base + ["--backend", "vllm", "--vllm-tensor-parallel-size", "4", "--no-vllm-enforce-eager",
                                     "--vllm-capture", "logprobs"])
    assert given(args, VllmOptions, prefix="vllm") == {"tensor_parallel_size": 4, "capture": "logprobs",
                                                        "enforce_eager": False}
    assert given(parser.parse_args(base), VllmOptions, prefix="vllm") == {}
    args = parser.parse_args(base + ["--vllm-max-num-seqs", "4"])
    s = BuildSettings(**given(args, BuildSettings), vllm=given(args, VllmOptions, prefix="vllm"))
    with pytest.raises(BuildError, match="--vllm-max-num-seqs needs --backend vllm"):
        s.validate()
