"""The `kdcache` command as a whole (issue #19): every numeric option of every subcommand, set to 0, -1, nan, inf and
a huge value, is one line on stderr and a non-zero exit, never a traceback; every --help shows the defaults.

The options come from `kdcache.cli.build_parser()`, so a new command or option is swept without editing this file
(a new command needs its row in FAIL_FAST, which the first test asks for). Inputs that do not exist make a legal
value fail fast too, with the one line that names the missing input, instead of starting real work.
"""

from __future__ import annotations

import argparse

import pytest

from cache_builder.settings import BuildSettings, VllmOptions
from formats.settings import default_of, flag_of, setting_fields
from kdcache.cli import (
    ConvertSettings,
    DemoSettings,
    InspectSettings,
    MergeSettings,
    VerifySettings,
    build_parser,
)
from student_trainer.settings import EvalSettings, TrainSettings
from tests.bad_input_cases import run_forked

VALUES = ["0", "-1", "nan", "inf", "huge"]  # "huge": 10**12 for an integer, 1e30 for a float
MISSING = "no-such"  # every input path below names something that does not exist

# Per command: arguments with missing inputs ({tmp}: the test's folder), so a value that passes the checks still
# ends in one error line at once.
FAIL_FAST = {
    "build": ["--teacher", f"{{tmp}}/{MISSING}-teacher", "--corpus", f"{{tmp}}/{MISSING}-corpus", "--out", "{tmp}/out"],
    "merge": ["{tmp}/out", f"{{tmp}}/out/{MISSING}-part"],
    "inspect": [f"{{tmp}}/{MISSING}-cache"],
    "verify": [f"{{tmp}}/{MISSING}-cache"],
    "convert": [f"{{tmp}}/{MISSING}-cache", "--out", "{tmp}/out"],
    "train": ["--cache", f"{{tmp}}/{MISSING}-cache", "--out", "{tmp}/out", "--student", f"{{tmp}}/{MISSING}-student"],
    "eval": ["--student", f"{{tmp}}/{MISSING}-student", "--cache", f"{{tmp}}/{MISSING}-cache"],
    "demo": ["--corpus", f"{{tmp}}/{MISSING}-corpus", "--out", "{tmp}/out"],
}
# The settings behind each command's flags (class, flag prefix), for the defaults --help must show.
SETTINGS = {
    "build": [(BuildSettings, ""), (VllmOptions, "vllm")], "merge": [(MergeSettings, "")],
    "inspect": [(InspectSettings, "")], "verify": [(VerifySettings, "")], "convert": [(ConvertSettings, "")],
    "train": [(TrainSettings, "")], "eval": [(EvalSettings, "")], "demo": [(DemoSettings, "")],
}


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def numeric_kind(action: argparse.Action) -> str:
    """'int' or 'float' for an option that takes a number, 'list' for one that takes numbers ('0.9,0.95',
    '-1,12'), '' otherwise."""
    if not action.option_strings or action.type is None:
        return ""
    if action.type in (int, float):
        return action.type.__name__
    try:
        parsed = action.type("1,1")
    except (argparse.ArgumentTypeError, TypeError, ValueError):
        return ""
    numbers = isinstance(parsed, (list, tuple)) and all(isinstance(v, (int, float)) for v in parsed)
    return "list" if numbers else ""


def text_of(value: str, kind: str) -> str:
    if value == "huge":
        value = str(10**12) if kind == "int" else "1e30"
    return f"{value},{value}" if kind == "list" else value


def sweep() -> list[tuple[str, str, str, str]]:
    """(command, flag, kind, value) for every numeric option of every command and every value."""
    rows = []
    for name, sub in commands().items():
        for action in sub._actions:
            kind = numeric_kind(action)
            if kind:
                rows += [(name, action.option_strings[0], kind, v) for v in VALUES]
    return rows


def test_every_command_has_a_fail_fast_row_and_the_sweep_covers_the_numeric_options():
    assert sorted(FAIL_FAST) == sorted(commands()) == sorted(SETTINGS)
    flags = {(c, f) for c, f, _, _ in sweep()}
    # A few the issue names, so a parser change that hid them from the sweep would show here.
    for expected in [("build", "--temperature"), ("build", "--top-k"), ("build", "--vllm-gpu-memory-utilization"),
                     ("train", "--alpha"), ("train", "--lr"), ("train", "--betas"), ("train", "--warmup-steps"),
                     ("eval", "--batch-size"), ("convert", "--top-k"), ("build", "--hidden-layers")]:
        assert expected in flags


def test_every_numeric_option_of_every_command_is_one_line_and_a_non_zero_exit_never_a_traceback(tmp_path):
    rows = sweep()
    argvs = []
    for i, (command, flag, kind, value) in enumerate(rows):
        folder = tmp_path / f"case-{i:03d}"
        base = [a.format(tmp=folder) for a in FAIL_FAST[command]]
        backend = ["--backend", "vllm"] if flag.startswith("--vllm-") else []  # else "needs --backend vllm" wins
        argvs.append([command, *base, *backend, f"{flag}={text_of(value, kind)}"])
    runs = run_forked(argvs, tmp_path / "runs")
    wrong = []
    for (command, flag, kind, value), argv, run in zip(rows, argvs, runs):
        lines = run.stderr.strip().splitlines()
        line = lines[-1] if lines else ""
        key = flag.lstrip("-").replace("-", "_")
        problem = ""
        if run.returncode == 0:
            problem = "exit 0"
        elif "Traceback" in run.stderr or len(lines) != 1:
            problem = f"{len(lines)} lines on stderr"
        elif not line.startswith(f"kdcache {command}: error: "):
            problem = "not a kdcache error line"
        elif flag not in line and key not in line and MISSING not in line:
            problem = "names neither the option nor the missing input"
        elif value in ("nan", "inf") and kind != "int" and flag not in line and key not in line:
            problem = "a non-finite value was not refused by name"
        if problem:
            wrong.append(f"{' '.join(argv[-1:])} ({command}): {problem}: {run.stderr.strip()[-300:]}")
    assert wrong == [], "\n".join(wrong)
    assert len(rows) >= 5 * 40  # the sweep is not silently empty


@pytest.mark.parametrize("command", sorted(SETTINGS))
def test_help_shows_the_default_of_every_option_that_has_one(command):
    sub = commands()[command]
    helps = {a.option_strings[0]: a.help or "" for a in sub._actions if a.option_strings}
    missing = []
    for cls, prefix in SETTINGS[command]:
        for f in setting_fields(cls):
            default = default_of(f)
            if not f.metadata["cli"] or f.metadata["positional"] or f.metadata["required"]:
                continue
            if default in (None, "", [], {}):
                continue  # nothing to show: the option is off unless given
            shown = ("on" if default else "off") if isinstance(default, bool) else \
                ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
            if f"(default: {shown})" not in helps[flag_of(f, prefix)]:
                missing.append(flag_of(f, prefix))
    assert missing == []
