"""Bad input (issues #7 and #19): run every case of tests/bad_input_cases.py, each as a `kdcache` process of its own,
and write the table, case -> behaviour with the very line a user sees, into benchmarks/RESULTS.md, section "Bad input".

    .venv/bin/python benchmarks/bad_input.py

The last line printed is a JSON object {"cases": N, "clear_errors": M}: N rows, of which M behaved as the table
specifies (an error case: exit 2, one error line naming the file/line/field, nothing published or what the row's
check allows; a case that must succeed: it did, with the result checked). M == N is the goal. Rows numbered #N are
the cases of issue #19; its cases 10 and 12 (kill -9 and Ctrl-C of a trainer) need a signal sent mid-run and are
tested in tests/student_trainer/test_run_faults.py, and the numeric-option sweep in tests/test_cli.py.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the case table lives with the tests that assert it
sys.path.insert(0, str(ROOT))  # `benchmarks` is not an installed package

from bad_input_cases import BUILD, CASES, CONVERT, EVAL, TRAIN, Outcome, prepare, run_cases  # noqa: E402

from benchmarks.results import processor  # noqa: E402
from benchmarks.results import update_results  # noqa: E402


def _command(argv: list[str]) -> str:
    """The case's own arguments: the common ones (teacher, out, sizes) are left out of the table."""
    for base in (BUILD, TRAIN, EVAL, CONVERT):
        if argv[: len(base)] == base:
            return "kdcache " + " ".join([argv[0], *argv[len(base):]])
    return "kdcache " + " ".join(argv)


def _cell(text: str, tmp: str) -> str:
    return text.replace(tmp, "$TMP").replace("|", "\\|").replace("`", "'")


def table(outcomes: list[Outcome], tmp: str) -> str:
    lines = ["| case | command | exit | behaviour | what the user sees |", "|---|---|---|---|---|"]
    for o in outcomes:
        if o.case.succeed:
            behaviour = "succeeds as specified" if o.as_specified else f"WRONG: {o.problem}"
        else:
            behaviour = "one clear error line, nothing published" if o.as_specified else f"WRONG: {o.problem}"
        lines.append(f"| {o.case.name} | `{_cell(_command(o.case.argv), tmp)}` | {o.returncode} | "
                     f"{_cell(behaviour, tmp)} | `{_cell(o.shown, tmp)}` |")
    return "\n".join(lines)


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="kdcache-bad-input-") as tmp:
        outcomes = run_cases(CASES, prepare(Path(tmp) / "fixtures"), Path(tmp))
        body = table(outcomes, tmp)
    clear = sum(o.as_specified for o in outcomes)
    note = (f"`.venv/bin/python benchmarks/bad_input.py` runs each case of `tests/bad_input_cases.py` (the table "
            f"`tests/test_bad_input.py` asserts) as a `kdcache` process of its own (forked after the imports) on the "
            f"tiny test teacher. Paths under "
            f"the run's temporary folder are shown as `$TMP`; {{files}}, {{cache}}, ... are files it made there. "
            f"Rows numbered #N are the cases of issue #19 (its cases 10 and 12, signals sent to a running trainer, "
            f"are tested in tests/student_trainer/test_run_faults.py). "
            f"{clear} of {len(outcomes)} cases behaved as specified. Machine: {processor()}.")
    update_results("Bad input", note + "\n\n" + body)
    print(body)
    print(json.dumps({"cases": len(outcomes), "clear_errors": clear}))
    return 0 if clear == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
