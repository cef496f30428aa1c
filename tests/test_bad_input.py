"""Bad input, issue #7: every case of the table in bad_input_cases.py, run as a real `kdcache` process, gives
one clear error line naming the file, line, field or setting, a non-zero exit and nothing published; the two
cases that are not errors (a document longer than seq_len, --skip-bad-records) succeed as specified."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402

from tests.bad_input_cases import CASES, Case, Outcome, prepare, run_cases

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("bad-input")
    return {o.case.name: o for o in run_cases(CASES, prepare(root / "fixtures"), root)}


def test_the_table_covers_every_case_the_issue_lists():
    listed = ["empty corpus", "malformed JSON line", "--skip-bad-records", "missing text field", "non-UTF-8 bytes",
              "document longer than seq_len", "top-k larger than the vocab", "hidden layer out of range",
              "teacher folder missing", "teacher folder without weights", "student vocab smaller", "tokenizer mismatch",
              "unknown format version", "config key misspelled", "zero size", "negative size"]
    names = " | ".join(c.name for c in CASES)
    assert [item for item in listed if item not in names] == []
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_clear_error_and_publishes_nothing(case: Case, outcomes):
    outcome = outcomes[case.name]
    assert outcome.as_specified, f"{case.name}: {outcome.problem}"
    if not case.succeed:
        assert outcome.returncode == 2  # a KdError, not a crash
