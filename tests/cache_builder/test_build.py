"""`kdcache build` with the transformers backend: stored fields equal a direct torch computation, builds
resume after SIGKILL to the same bytes, settings, locks, packing, parts and merge."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from cache_builder.build import run_build
from cache_builder.capture import draw_samples
from cache_builder.errors import BuildError
from cache_builder.merge import merge_parts
from cache_builder.settings import BuildSettings
from formats.errors import CacheError, KdError
from formats.reader import open_cache
from formats.schema import bf16_to_f32
from formats.verify import verify_cache
from formats.writer import CacheWriter
from tests.cache_builder.tiny_teacher import PAD_ROWS

STDLIB = Path(os.__file__).parent




def write_corpus(folder: Path, names: list[str], chars: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        text = (STDLIB / name).read_text(encoding="utf-8")[:chars]
        (folder / (name.replace("/", "_") + ".txt")).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), ["colorsys.py", "textwrap.py", "json/decoder.py", "bisect.py",
                                                            "heapq.py", "keyword.py"], 3000)


def settings(teacher: Path, corpus: Path, out: Path, **kw) -> BuildSettings:
    # float32: the stored fields are compared with the float32 model (--dtype auto is bf16 on CPUs with bf16).
    base = dict(teacher=str(teacher), corpus=[str(corpus)], out=str(out), top_k=8, seq_len=128, shard_tokens=300,
                max_batch_tokens=512, progress=False, dtype="float32")
    base.update(kw)
    return BuildSettings(**base)


def direct_logprobs(model, ids: np.ndarray, vocab: int) -> tuple[torch.Tensor, tuple]:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64))[None], output_hidden_states=True)
    # The distribution of this sequence alone (no batch), in float64: the builder's float32 reduction must be
    # within float32 rounding of it (torch's own float32 log_softmax sums less accurately at this vocabulary).
    return torch.log_softmax(out.logits[0, :, :vocab].double(), dim=-1), out.hidden_states


@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
def test_every_stored_field_equals_a_direct_torch_computation(tiny_teacher, small_corpus, tmp_path, fmt):
    s = settings(tiny_teacher, small_corpus, tmp_path / "c", format=fmt, sample_draws=24, hidden_layers=[-1, 1],
                 heldout_fraction=0.3)
    man = run_build(s)
    assert verify_cache(s.out) == []
    assert man.build["hidden_layers"] == [1, 2]
    cache = open_cache(s.out)
    vocab = cache.manifest.vocab_size
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    assert model.config.vocab_size == vocab + PAD_ROWS
    checked = 0
    for split in ("train", "heldout"):
        for i in range(cache.num_sequences(split)):
            seq = cache.sequence(i, split)
            ids = seq["input_ids"]
            logp, hidden = direct_logprobs(model, ids, vocab)
            ref_lp, ref_ids = logp.topk(8, dim=-1)
            assert np.array_equal(seq["topk_ids"], ref_ids.numpy()), "top-k ids differ (or padded rows leaked in)"
            np.testing.assert_allclose(seq["topk_logprobs"], ref_lp.numpy(), atol=1e-5)
            tail = torch.logsumexp(logp.scatter(1, ref_ids, float("-inf")), dim=-1)  # the mass outside the top k
            np.testing.assert_allclose(seq["tail_logmass"], tail.numpy(), atol=1e-5, rtol=1e-4)
            target = logp[torch.arange(len(ids) - 1), torch.from_numpy(ids[1:].astype(np.int64))]
            np.testing.assert_allclose(seq["target_logprob"][:-1], target.numpy(), atol=1e-5)
            assert np.isnan(seq["target_logprob"][-1])
            mass = np.exp(seq["topk_logprobs"].astype(np.float64)).sum(1) + np.exp(seq["tail_logmass"].astype(np.float64))
            np.testing.assert_allclose(mass, 1.0, atol=1e-4)  # float32 log_softmax over 49k entries is normalised to ~2e-5
            assert (seq["sample_counts"].astype(int).sum(1) == 24).all()
            for layer in (1, 2):
                want = hidden[layer][0].to(torch.bfloat16).float().numpy()
                got = bf16_to_f32(seq[f"hidden/{layer}"])
                np.testing.assert_allclose(got, want, atol=2e-2, rtol=1e-2)
            checked += 1
    assert checked == cache.num_sequences() > 5


def test_a_samples_only_build_stores_the_same_draws_as_a_top_k_build_and_no_top_k(tiny_teacher, small_corpus, tmp_path):
    run_build(settings(tiny_teacher, small_corpus, tmp_path / "k8", sample_draws=16))
    alone = run_build(settings(tiny_teacher, small_corpus, tmp_path / "k0", top_k=0, sample_draws=16))
    assert alone.top_k == 0 and "topk_ids" not in alone.fields and "topk_logprobs" not in alone.fields
    assert verify_cache(str(tmp_path / "k0")) == []
    a, b = open_cache(tmp_path / "k8"), open_cache(tmp_path / "k0")
    for ea, eb in zip(a.shards(), b.shards(), strict=True):
        x, y = a.read_shard(ea), b.read_shard(eb)
        for name in ("input_ids", "sample_ids", "sample_counts"):
            assert np.array_equal(x.token[name], y.token[name]), name
        # The normaliser is summed in another order without a top-k (all at once, not tail + top k): last bits.
        np.testing.assert_allclose(x.token["target_logprob"], y.token["target_logprob"], rtol=0, atol=2e-6)
        assert np.all(y.token["tail_logmass"] == 0.0)
    assert "none (samples-only RS-KD cache)" in (tmp_path / "k0" / "README.md").read_text()


def test_rskd_sample_counts_follow_the_teacher_distribution():
    """Chi-square goodness of fit of 20000 rows x 50 draws against the distribution they came from."""
    gen = torch.Generator().manual_seed(1234)
    logits = torch.randn(12, generator=gen) * 1.5
    logp = torch.log_softmax(logits, -1)
    rows = 20000
    ids, counts = draw_samples(logp.exp().expand(rows, -1).contiguous(), 50, 50, gen)
    assert (counts.sum(1) == 50).all()
    observed = torch.zeros(12, dtype=torch.float64).index_add_(0, ids[ids >= 0].long(), counts[ids >= 0].double())
    expected = logp.double().exp() * rows * 50
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    df = 11
    assert chi2 < df + 6 * (2 * df) ** 0.5, f"chi-square {chi2:.1f} too large for {df} degrees of freedom"
    # ids are distinct per row, ordered by count descending then id ascending, padding last
    first = ids[0][counts[0] > 0].tolist()
    c = counts[0][counts[0] > 0].tolist()
    assert sorted(zip([-x for x in c], first)) == list(zip([-x for x in c], first))


def test_a_different_command_on_an_existing_cache_is_refused_unless_overwrite(tiny_teacher, small_corpus, tmp_path):
    run_build(settings(tiny_teacher, small_corpus, tmp_path / "c"))
    with pytest.raises(CacheError, match="build.top_k"):
        run_build(settings(tiny_teacher, small_corpus, tmp_path / "c", top_k=4))
    man = run_build(settings(tiny_teacher, small_corpus, tmp_path / "c", top_k=4, overwrite=True))
    assert man.top_k == 4 and verify_cache(str(tmp_path / "c")) == []
    again = run_build(settings(tiny_teacher, small_corpus, tmp_path / "c", top_k=4))  # same command: nothing to do
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in man.shards]


def test_a_second_builder_on_the_same_output_is_refused_by_the_lock(tiny_teacher, small_corpus, tmp_path):
    s = settings(tiny_teacher, small_corpus, tmp_path / "c")
    run_build(s)
    holder = CacheWriter(s.out, open_cache(s.out).manifest, shard_tokens=300)
    try:
        with pytest.raises(CacheError, match="another process is writing"):
            run_build(s)
    finally:
        holder.close()


def test_packed_documents_get_the_records_of_each_document_alone(tiny_teacher, small_corpus, tmp_path):
    s = settings(tiny_teacher, small_corpus, tmp_path / "c", packing=True, seq_len=512, txt_split="paragraphs")
    run_build(s)
    assert verify_cache(s.out) == []
    cache = open_cache(s.out)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    packed = 0
    for i in range(cache.num_sequences("train")):
        seq = cache.sequence(i, "train")
        starts = list(np.flatnonzero(seq["position_ids"] == 0)) + [len(seq["input_ids"])]
        packed += len(starts) > 2
        for a, b in zip(starts, starts[1:]):
            logp, _ = direct_logprobs(model, seq["input_ids"][a:b], cache.manifest.vocab_size)
            assert np.array_equal(seq["topk_ids"][a:b], logp.topk(8, -1).indices.numpy())
    assert packed > 0, "no sequence held two documents; the test proves nothing"


def test_parts_merge_into_one_cache_holding_every_sequence_once(tiny_teacher, small_corpus, tmp_path):
    whole = run_build(settings(tiny_teacher, small_corpus, tmp_path / "whole"))
    parts = []
    for part in range(2):
        out = tmp_path / "merged" / f"part-{part}"
        run_build(settings(tiny_teacher, small_corpus, out, num_parts=2, part=part))
        parts.append(str(out))
    merged = merge_parts(tmp_path / "merged", parts)
    assert verify_cache(str(tmp_path / "merged")) == []
    assert merged.totals()["tokens"] == whole.totals()["tokens"]
    docs_whole = sorted(int(open_cache(tmp_path / "whole").sequence(i)["doc_index"]) for i in range(whole.totals()["sequences"]))
    m = open_cache(tmp_path / "merged")
    docs_merged = sorted(int(m.sequence(i)["doc_index"]) for i in range(merged.totals()["sequences"]))
    assert docs_merged == docs_whole
    with pytest.raises(BuildError, match="needs exactly"):
        merge_parts(tmp_path / "merged", parts[:1])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"top_k": 10**6}, "larger than the teacher's vocabulary"),
        ({"hidden_layers": [7]}, "layer 7 is out of range"),
        ({"teacher": "/nonexistent/teacher"}, "no such folder"),
        ({"shard_tokens": 0}, "--shard-tokens must be positive"),
        ({"seq_len": 0}, "--seq-len must be positive"),
        ({"top_k": 0}, r"--top-k must be positive, or 0 for a samples-only RS-KD cache with --sample-draws"),
        ({"top_k": -1, "sample_draws": 8}, r"--top-k must be non-negative, got -1"),
    ],
)
def test_bad_build_settings_give_one_clear_error(tiny_teacher, small_corpus, tmp_path, change, message):
    change = dict(change)
    teacher = change.pop("teacher", tiny_teacher)
    with pytest.raises(KdError, match=message):
        run_build(settings(teacher, small_corpus, tmp_path / "c", **change))
    assert not (tmp_path / "c" / "shards").exists() or not any((tmp_path / "c" / "shards").iterdir())


def test_cli_reports_bad_input_on_one_line_with_exit_status_2(tiny_teacher, small_corpus, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kdcache.cli", "build", "--teacher", str(tiny_teacher), "--corpus",
                           str(small_corpus), "--out", str(tmp_path / "c"), "--top-k", "1000000", "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdcache build: error:") and "--top-k" in lines[0]


@pytest.mark.integration
def test_embedded_teacher_cache_matches_direct_computation(teacher_dir, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", ["colorsys.py"], 1500)
    s = settings("default", corpus, tmp_path / "c", top_k=16, seq_len=256, logprob_dtype="fp32")
    s.teacher = "default"
    man = run_build(s)
    assert man.teacher["num_layers"] == 30 and man.tokenizer["vocab_size"] == 49152
    cache = open_cache(s.out)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    seq = cache.sequence(0)
    logp, _ = direct_logprobs(model, seq["input_ids"], 49152)
    ref = logp.topk(16, -1)
    assert (seq["topk_ids"] == ref.indices.numpy()).mean() > 0.999
    np.testing.assert_allclose(seq["topk_logprobs"], ref.values.numpy(), atol=1e-4)
