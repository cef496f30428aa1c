"""The rules of a training run's folder (student_trainer/run_folder.py, issue #19 case 11), in-process: a user's
folder is never written to, a held folder is refused, --resume needs a checkpoint, a fresh run never mixes with
an older run's checkpoints. Real `kdcache train` processes meeting these rules: test_run_faults.py."""

from __future__ import annotations

import pytest

from student_trainer.errors import TrainError
from student_trainer.run_folder import LOCK_NAME, RUN_MARKER, check_run_folder, claim_run_folder


def test_a_new_folder_is_created_marked_and_locked_and_released(tmp_path):
    out = tmp_path / "a" / "run"
    check_run_folder(out, resume=False)
    assert not out.exists()  # the early check creates nothing
    run = claim_run_folder(out, resume=False)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, RUN_MARKER]
    with pytest.raises(TrainError, match="another kdcache train is writing this run"):
        check_run_folder(out, resume=False)
    with pytest.raises(TrainError, match="another kdcache train is writing this run"):
        claim_run_folder(out, resume=False)
    run.release()
    claim_run_folder(out, resume=False).release()  # a run folder of ours, with no checkpoint: a fresh run may use it


def test_a_users_non_empty_folder_is_refused_and_left_as_it_was(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.jsonl").write_text("my own numbers\n")
    for call in (check_run_folder, claim_run_folder):
        with pytest.raises(TrainError, match=r"is not empty \(metrics.jsonl\) and is not a kdcache training run"):
            call(out, resume=False)
    assert [p.name for p in out.iterdir()] == ["metrics.jsonl"]  # not even a lock file was made
    assert (out / "metrics.jsonl").read_text() == "my own numbers\n"


def test_an_empty_folder_and_a_file_at_out(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    claim_run_folder(empty, resume=False).release()
    assert (empty / RUN_MARKER).exists()
    file = tmp_path / "notes.txt"
    file.write_text("x")
    with pytest.raises(TrainError, match="is a file, not a folder"):
        claim_run_folder(file, resume=False)
    assert file.read_text() == "x"


def test_resume_needs_a_checkpoint_and_a_fresh_run_refuses_an_older_runs_checkpoints(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainError, match=f"no checkpoint in {out}; drop --resume to start"):
        check_run_folder(out, resume=True)
    claim_run_folder(out, resume=False).release()
    with pytest.raises(TrainError, match="no checkpoint in"):
        claim_run_folder(out, resume=True)
    (out / "checkpoints" / "step-0000004").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step-0000004")
    with pytest.raises(TrainError, match=r"holds a run with checkpoints \(latest step-0000004\); add --resume"):
        claim_run_folder(out, resume=False)
    claim_run_folder(out, resume=True).release()
