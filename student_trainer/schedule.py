"""Values that change with the step: the learning rate's factor, alpha, temperature, loss weights, and named
training phases.

A schedule is a plain dict, as written in the YAML config:
    {"kind": "constant", "value": 0.5}
    {"kind": "linear", "start": 1.0, "end": 0.1, "steps": 1000}     # then holds `end`
    {"kind": "cosine", "start": 1.0, "end": 0.0, "steps": 1000}
    {"kind": "step", "values": [1.0, 0.5, 0.1], "boundaries": [100, 200]}
    {"kind": "warmup", "value": 1.0, "steps": 100}                   # 0 -> value linearly, then value
A bare number means constant. Phases are consecutive step ranges with their own overrides:
    phases: [{name: features, steps: 200, kd_weight: 0, hidden_weight: 1},
             {name: soft_labels, steps: 800, hidden_weight: 0}, {name: joint, steps: 1000}]
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from formats.errors import KdError

SCHEDULE_KEYS = {
    "constant": {"value"},
    "linear": {"start", "end", "steps"},
    "cosine": {"start", "end", "steps"},
    "step": {"values", "boundaries"},
    "warmup": {"value", "steps"},
}


class ScheduleError(KdError):
    """A schedule or phase in the config is malformed; the message names it."""


def check_schedule(name: str, spec) -> None:
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return
    if not isinstance(spec, dict) or spec.get("kind") not in SCHEDULE_KEYS:
        raise ScheduleError(f"schedule {name!r}: expected a number or {{kind: {'|'.join(SCHEDULE_KEYS)}, ...}}, got {spec!r}")
    want = SCHEDULE_KEYS[spec["kind"]]
    got = set(spec) - {"kind"}
    if got != want:
        raise ScheduleError(f"schedule {name!r} ({spec['kind']}): needs keys {sorted(want)}, got {sorted(got)}")
    if spec["kind"] == "step" and len(spec["values"]) != len(spec["boundaries"]) + 1:
        raise ScheduleError(f"schedule {name!r}: step needs one more value than boundaries")
    if "steps" in spec and (not isinstance(spec["steps"], int) or spec["steps"] <= 0):
        raise ScheduleError(f"schedule {name!r}: steps must be a positive integer")


def value_at(spec, step: int) -> float:
    """The schedule's value at `step` (0-based)."""
    if not isinstance(spec, dict):
        return float(spec)
    kind = spec["kind"]
    if kind == "constant":
        return float(spec["value"])
    if kind == "warmup":
        return float(spec["value"]) * min(1.0, (step + 1) / spec["steps"])
    if kind == "step":
        i = sum(step >= b for b in spec["boundaries"])
        return float(spec["values"][i])
    frac = min(1.0, step / spec["steps"])
    if kind == "cosine":
        frac = 0.5 * (1.0 - math.cos(math.pi * frac))
    return float(spec["start"]) + (float(spec["end"]) - float(spec["start"])) * frac


def phase_at(phases: list[dict], step: int) -> tuple[str, dict, int]:
    """(name, overrides, first step) of the phase holding `step`; the last phase runs on past its end."""
    if not phases:
        return "", {}, 0
    first = 0
    for phase in phases:
        if step < first + phase["steps"] or phase is phases[-1]:
            return phase.get("name", ""), {k: v for k, v in phase.items() if k not in ("name", "steps")}, first
        first += phase["steps"]
    raise AssertionError("unreachable")


def scheduled_values(schedules: Mapping[str, object], phases: list[dict], step: int) -> dict:
    """{"phase": name, key: value, ...} at `step`, for each key -> schedule of `schedules`; the phase holding
    `step` may override a key's schedule, and such a schedule counts steps from the phase's start."""
    name, overrides, start = phase_at(phases, step)
    out = {"phase": name}
    for key, spec in schedules.items():
        if key in overrides:
            out[key] = value_at(overrides[key], step - start)
        else:
            out[key] = value_at(spec, step)
    return out


def lr_factor(step: int, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """The peak learning rate's multiplier at `step`: linear warmup over `warmup_steps`, then a cosine decay that
    reaches `min_lr_ratio` at `steps` and stays there. The warmup is capped at `steps`: a run shorter than its
    warmup (5 steps against the default 10) still reaches the peak rate, at its last step."""
    warmup_steps = min(warmup_steps, steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    frac = (step - warmup_steps) / max(1, steps - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
