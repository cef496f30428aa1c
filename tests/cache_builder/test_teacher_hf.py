"""cache_builder.teacher_hf: a CPU batch runs as forwards of bounded size, the same records as one forward, and
reports each row to the progress callback as it finishes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cache_builder import teacher_hf
from cache_builder.capture import CaptureSettings
from cache_builder.teacher import Job
from cache_builder.teacher_hf import cpu_width, forward_groups, forward_records, load_hf_teacher


def jobs(lengths: list[int]) -> list[Job]:
    rng = np.random.default_rng(0)
    return [Job(i, 0, rng.integers(0, 49152, n).astype(np.int32), int(rng.integers(0, 49152)), 100 + i)
            for i, n in enumerate(lengths)]


def test_forward_groups_keep_the_padded_size_within_the_bound_and_the_order():
    batch = jobs([100, 60, 50, 30, 10, 10, 10])
    groups = forward_groups(batch, 256)
    assert [j for g in groups for j in g] == batch
    # Widths are rounded up (cpu_width): 2 x 112, 4 x 64, then 1 x 16.
    assert all(cpu_width(max(len(j.ids) for j in g)) * len(g) <= 256 for g in groups)
    assert [len(g) for g in groups] == [2, 4, 1]
    assert forward_groups(batch, None) == [batch]
    long = jobs([300])
    assert forward_groups(long, 256) == [long]  # a row longer than the bound runs alone


def test_a_cpu_batch_split_into_forwards_gives_the_records_of_one_forward_and_reports_each_row(
        tiny_teacher: Path, monkeypatch):
    teacher = load_hf_teacher(str(tiny_teacher), "float32", "cpu")
    batch = jobs([40, 33, 20, 20, 7])
    cs = CaptureSettings(top_k=5, vocab_size=49152, sample_draws=8)
    whole = forward_records(teacher, [j.ids for j in batch], [j.seed for j in batch], cs, [1], "BF16",
                            [j.next_id for j in batch])
    monkeypatch.setattr(teacher_hf, "CPU_FORWARD_TOKENS", 128)
    calls = []
    model = teacher.model
    monkeypatch.setattr(teacher, "model", lambda **kw: calls.append(kw["input_ids"].shape) or model(**kw))
    reported = []
    split = teacher.run(batch, cs, [1], "BF16", progress=reported.append)
    # Widths rounded up (cpu_width): 40 + 33 padded to 2 x 48, then 20 + 20 + 7 to 3 x 32, each <= 128.
    assert [tuple(c) for c in calls] == [(2, 48), (3, 32)]
    assert reported == [len(j.ids) for j in batch]
    for a, b in zip(split, whole):
        assert a.keys() == b.keys()
        np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"])
        for name in ("topk_logprobs", "tail_logmass", "target_logprob"):
            np.testing.assert_allclose(a[name], b[name], atol=1e-5, rtol=0, err_msg=name)
        assert (a["sample_counts"].sum(1) == 8).all()
