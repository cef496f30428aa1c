"""`kdcache demo --quick`: the whole job end to end on the embedded teacher, as `make demo` runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.integration
def test_quick_demo_builds_trains_evaluates_and_reports(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "kdcache.cli", "demo", "--quick", "--out", str(tmp_path / "demo")],
                          capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary["heldout_ce"]) == {"kd", "ce_only"} and isinstance(summary["kd_beats_ce"], bool)
    report = (tmp_path / "demo" / "report.md").read_text()
    verdict = "Distillation helped" if summary["kd_beats_ce"] else "Distillation did NOT help"
    assert verdict in report and verdict in proc.stdout
    assert "| KD from cache |" in report and "| CE only |" in report
    # bits per byte: in the table and the summary, so students with other tokenizers compare with these
    assert set(summary["heldout_bpb"]) == {"kd", "ce_only"} and all(0 < v < 10 for v in summary["heldout_bpb"].values())
    assert "| | ce | bpb |" in report
    assert f"KD {summary['heldout_bpb']['kd']:.3f}, CE only {summary['heldout_bpb']['ce_only']:.3f}" in report
    assert "Both students: 16 steps" in report and "warmup steps" in report  # the shared settings are stated
    assert "$ kdcache build --teacher default" in proc.stdout and "$ kdcache train --cache" in proc.stdout
    assert (tmp_path / "demo" / "kd" / "final" / "config.json").exists()  # the builder and trainer ran in-process
    # The plot draws one comparable quantity for both students: held-out CE during training, whose last point is the
    # table's (issue #19, case 15); the report says what one seed can and cannot show.
    assert (tmp_path / "demo" / "heldout_ce.png").stat().st_size > 1000 and not (tmp_path / "demo" / "loss.png").exists()
    for name in ("kd", "ce_only"):
        rows = [json.loads(x) for x in (tmp_path / "demo" / name / "metrics.jsonl").read_text().splitlines()]
        evaluated = [(r["step"], r["eval_ce"]) for r in rows if "eval_ce" in r]
        assert [step for step, _ in evaluated] == [4, 8, 12, 16]
        assert evaluated[-1][1] == pytest.approx(summary["heldout_ce"][name], rel=1e-6)  # batch order of float sums
    assert "One seed: the gap between the two students includes the run-to-run variation" in report
    assert "![held-out CE](heldout_ce.png)" in report
    from formats.verify import verify_cache

    assert verify_cache(str(tmp_path / "demo" / "cache")) == []
