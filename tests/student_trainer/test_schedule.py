"""student_trainer.schedule: schedules' values at given steps, phases that override them, and the learning rate's
warmup and cosine decay."""

from __future__ import annotations

import pytest

from student_trainer.schedule import lr_factor, scheduled_values, value_at
from student_trainer.settings import TrainSettings


LINEAR = {"kind": "linear", "start": 1.0, "end": 0.1, "steps": 10}
COSINE = {"kind": "cosine", "start": 1.0, "end": 0.0, "steps": 10}
STEP = {"kind": "step", "values": [1.0, 0.5, 0.1], "boundaries": [100, 200]}
WARMUP = {"kind": "warmup", "value": 2.0, "steps": 4}


@pytest.mark.parametrize("spec, step, expected", [
    (0.5, 7, 0.5), ({"kind": "constant", "value": 0.25}, 1000, 0.25),
    (LINEAR, 0, 1.0), (LINEAR, 5, 0.55), (LINEAR, 10, 0.1), (LINEAR, 50, 0.1),
    (COSINE, 0, 1.0), (COSINE, 5, 0.5), (COSINE, 10, 0.0), (COSINE, 30, 0.0),
    (STEP, 0, 1.0), (STEP, 99, 1.0), (STEP, 100, 0.5), (STEP, 199, 0.5), (STEP, 200, 0.1),
    (WARMUP, 0, 0.5), (WARMUP, 2, 1.5), (WARMUP, 3, 2.0), (WARMUP, 40, 2.0),
])
def test_schedules_give_their_values_at_given_steps(spec, step, expected):
    assert value_at(spec, step) == pytest.approx(expected)


def test_phases_switch_the_weights_and_their_schedules_count_from_the_phase_start():
    s = TrainSettings(cache="c", out="o", student="s", alpha={"kind": "linear", "start": 1.0, "end": 0.0, "steps": 100},
                      phases=[{"name": "features", "steps": 10, "kd_weight": 0, "hidden_weight": 1},
                              {"name": "soft", "steps": 20, "temperature": {"kind": "linear", "start": 4.0, "end": 1.0,
                                                                            "steps": 10}},
                              {"name": "joint", "steps": 5}])
    s.validate()
    schedules = {key: getattr(s, key) for key in s.SCHEDULED}
    at = {step: scheduled_values(schedules, s.phases, step) for step in (0, 9, 10, 15, 30, 1000)}
    assert at[0] == {"phase": "features", "alpha": 1.0, "temperature": 1.0, "kd_weight": 0.0, "hidden_weight": 1.0}
    assert at[9]["phase"] == "features" and at[9]["alpha"] == pytest.approx(0.91)  # global schedules count globally
    assert at[10] == {"phase": "soft", "alpha": pytest.approx(0.9), "temperature": 4.0, "kd_weight": 1.0,
                      "hidden_weight": 0.0}
    assert at[15]["temperature"] == pytest.approx(2.5)  # the phase's schedule starts at the phase's first step
    assert at[30]["phase"] == "joint" and at[30]["temperature"] == 1.0
    assert at[1000]["phase"] == "joint" and at[1000]["alpha"] == 0.0  # the last phase runs on


def test_the_learning_rate_warms_up_linearly_then_decays_by_cosine_to_min_lr_ratio():
    s = TrainSettings(steps=110, warmup_steps=10, min_lr_ratio=0.1)

    def factor(step: int) -> float:
        return lr_factor(step, s.steps, s.warmup_steps, s.min_lr_ratio)

    assert [factor(i) for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert [factor(i) for i in (10, 60, 110, 500)] == pytest.approx([1.0, 0.55, 0.1, 0.1])


def test_a_run_shorter_than_its_warmup_still_reaches_the_peak_learning_rate():
    # 5 steps against the default 10 warmup steps: uncapped, the rate would stop at half its peak.
    assert [lr_factor(i, 5, 10, 0.1) for i in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert TrainSettings().warmup_steps == 10 and lr_factor(0, 1, 10, 0.1) == 1.0
