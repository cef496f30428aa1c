"""A `kdcache train` process SIGKILLed mid-epoch and resumed trains on every sequence of the split exactly once per
epoch: no sample repeated, none skipped (issue #7, Faults). test_train_end_to_end.py proves the resumed parameters
equal the uninterrupted ones; this test looks at the data itself.

The run is wrapped by a small script that logs, as the training loop takes them, the sequences of every batch
(flushed per batch, so a SIGKILL loses none). What the model learned from is the killed run's batches up to its
last checkpoint, then the resumed run's batches; the batches the killed run took after its checkpoint were lost
with its optimizer steps and are redone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from formats.reader import open_cache

pytestmark = pytest.mark.integration

STEPS = 12  # 2 sequences a step: more than one epoch of the tiny cache's train split
LOGGING_SCRIPT = '''
"""Run `kdcache ARGS...`, logging each batch the training loop takes to $KDCACHE_BATCH_LOG."""
import json
import os
import sys

import numpy as np

from student_trainer import loader

log = open(os.environ["KDCACHE_BATCH_LOG"], "a")
read_batches = loader.EpochReader.batches


def logged_batches(self, epoch, start_step=0):
    for batch in read_batches(self, epoch, start_step):
        rows = [[doc, np.trim_zeros(batch.input_ids[r].numpy().astype(np.int64), "b").tobytes().hex()]
                for r, doc in enumerate(batch.doc_index.tolist()) if doc >= 0]
        log.write(json.dumps({"epoch": epoch, "rows": rows}) + "\\n")
        log.flush()
        yield batch


if __name__ == "__main__":
    loader.EpochReader.batches = logged_batches
    from kdcache.cli import main

    sys.exit(main(sys.argv[1:]))
'''


def sequence_ids(url: str, split: str) -> list[tuple[int, str]]:
    """(doc_index, hex of the int64 tokens) of every sequence of the split, as the script logs them."""
    seqs = [block.get(j) for block in open_cache(url).iter_blocks(split) for j in range(len(block))]
    return [(int(s["doc_index"]), np.trim_zeros(s["input_ids"].astype(np.int64), "b").tobytes().hex()) for s in seqs]


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_run_killed_mid_epoch_and_resumed_sees_every_sequence_once_per_epoch(tiny_teacher, tiny_cache, tmp_path):
    script = tmp_path / "logged_kdcache.py"
    script.write_text(LOGGING_SCRIPT)
    out = tmp_path / "run"
    args = ["train", "--cache", tiny_cache, "--out", str(out), "--student-layers", "1", "--init-from-teacher",
            str(tiny_teacher), "--steps", str(STEPS), "--batch-size", "2", "--seed", "0", "--num-workers", "0",
            "--checkpoint-every", "3", "--no-progress"]
    killed_log, resumed_log = tmp_path / "killed.jsonl", tmp_path / "resumed.jsonl"
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "KDCACHE_BATCH_LOG": str(killed_log)}, start_new_session=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not (out / "checkpoints" / "latest").exists():
        time.sleep(0.01)
    alive = proc.poll() is None
    if alive:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert alive, "the run ended before it could be killed"
    kept_steps = int((out / "checkpoints" / "latest").read_text().strip().split("-")[1])
    resumed = subprocess.run([sys.executable, str(script), *args, "--resume"], capture_output=True, text=True,
                             env={**os.environ, "KDCACHE_BATCH_LOG": str(resumed_log)}, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    taken = read_log(killed_log)
    assert kept_steps < len(taken) + 1 and kept_steps < STEPS
    trained = taken[:kept_steps] + read_log(resumed_log)  # one batch a step (grad_accum 1)
    assert len(trained) == STEPS

    split = sequence_ids(tiny_cache, "train")
    assert len(set(split)) == len(split)
    per_epoch: dict[int, Counter] = {}
    for batch in trained:
        per_epoch.setdefault(batch["epoch"], Counter()).update(tuple(r) for r in batch["rows"])
    epochs = sorted(per_epoch)
    assert epochs[0] == 0 and len(epochs) >= 2, "the run must cross an epoch boundary"
    assert kept_steps * 2 < len(split), "the kill must fall inside the first epoch"
    repeated = {k: n for c in per_epoch.values() for k, n in c.items() if n > 1}
    assert repeated == {}, "a sequence was trained on twice in one epoch"
    for epoch in epochs[:-1]:  # every finished epoch covers the split exactly
        assert sorted(per_epoch[epoch]) == sorted(split), f"epoch {epoch} skipped or invented sequences"
    assert set(per_epoch[epochs[-1]]) <= set(split)
