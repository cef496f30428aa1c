"""Whole `kdcache train` runs on the tiny teacher's cache, as separate processes: a real KD signal and a folder
transformers loads, exact resume after SIGKILL (with and without loader workers), and DDP on two CPU processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from formats.reader import open_cache
from student_trainer.loader import EpochReader, LoaderSettings

pytestmark = pytest.mark.integration

METRIC_KEYS = {"split", "positions", "kl_to_teacher", "top1_agreement", "top5_overlap", "ce", "perplexity", "ece", "bpb",
               "aligned_fraction"}


def kdcache(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdcache.cli", *args], capture_output=True, text=True, timeout=timeout)


def train_args(cache: str, teacher: Path, out: Path, steps: int, **extra) -> list[str]:
    """`kdcache train` arguments for a 1-layer student derived from the tiny teacher, 2 sequences per step."""
    args = ["train", "--cache", cache, "--out", str(out), "--student-layers", "1", "--init-from-teacher", str(teacher),
            "--steps", str(steps), "--batch-size", "2", "--lr", "1e-3", "--seed", "0", "--no-progress"]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def split_sequences(url: str, split: str) -> list[tuple[int, bytes]]:
    """(doc_index, int64 tokens without trailing zeros) of every sequence of the split, sorted, as the DDP script
    records what it reads (batches pad with 0)."""
    seqs = [block.get(j) for block in open_cache(url).iter_blocks(split) for j in range(len(block))]
    return sorted((int(s["doc_index"]), np.trim_zeros(s["input_ids"].astype(np.int64), "b").tobytes()) for s in seqs)


def test_training_reduces_the_kd_loss_and_writes_a_folder_transformers_loads(tiny_teacher, tiny_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    proc = kdcache(*train_args(tiny_cache, tiny_teacher, out, steps=30, num_workers=0, checkpoint_every=0))
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = [m["loss"] for m in metrics(out)]
    assert len(losses) == 30 and all("kd_mix" in m for m in metrics(out))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.6 * first, f"KD loss went from {first:.4f} to {last:.4f}: no real learning signal"
    final = out / "final"
    assert (final / "model.safetensors").exists() and not list(final.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.num_hidden_layers == 1
    proc = kdcache("eval", "--student", str(final), "--cache", tiny_cache, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == METRIC_KEYS and result["kl_to_teacher"] > 1e-3 and 0 <= result["top1_agreement"] <= 1


def test_a_samples_only_cache_trains_rskd_exactly_as_its_source_and_refuses_top_k_losses(tiny_teacher, tiny_cache,
                                                                                          tmp_path):
    k0 = str(tmp_path / "k0")
    proc = kdcache("convert", tiny_cache, "--out", k0, "--top-k", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = {}
    for name, cache, workers in (("source", tiny_cache, 0), ("k0", k0, 1)):
        out = tmp_path / f"run_{name}"
        proc = kdcache(*train_args(cache, tiny_teacher, out, steps=6, num_workers=workers, checkpoint_every=0,
                                   kd_kind="rskd"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = [m["loss"] for m in metrics(out)]
    assert len(runs["k0"]) == 6 and runs["k0"] == runs["source"]  # the samples are all RS-KD reads
    proc = kdcache(*train_args(k0, tiny_teacher, tmp_path / "ghost", steps=1, kd_kind="fkl_ghost"))
    assert proc.returncode == 2 and "keeps only RS-KD samples (top_k 0); use kd_kind rskd" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    results = {}
    for cache in (tiny_cache, k0):
        proc = kdcache("eval", "--student", str(tmp_path / "run_k0" / "final"), "--cache", cache, "--json")
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[cache] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results[k0]["kl_to_teacher"] is None and results[k0]["top1_agreement"] is None
    assert results[k0]["ce"] == results[tiny_cache]["ce"] and results[k0]["positions"] == results[tiny_cache]["positions"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_teacher, tiny_cache, tmp_path_factory) -> Path:
    """8 steps without a break; loader workers do not change the order of batches, so it serves every resume test."""
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = kdcache(*train_args(tiny_cache, tiny_teacher, out, steps=8, num_workers=0, checkpoint_every=0))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resume_after_sigkill_reproduces_the_uninterrupted_parameters(tiny_teacher, tiny_cache, uninterrupted, tmp_path,
                                                                      num_workers):
    out = tmp_path / "killed"
    args = train_args(tiny_cache, tiny_teacher, out, steps=8, num_workers=num_workers, checkpoint_every=3)
    # Its own session, so that SIGKILL takes the loader's worker processes down with it, as a dying node would.
    proc = subprocess.Popen([sys.executable, "-m", "kdcache.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not (out / "checkpoints" / "latest").exists():
        time.sleep(0.01)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed, "the run ended before it could be killed"
    assert not (out / "final").exists()
    resumed = kdcache(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    want, got = load_file(uninterrupted / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), "the resumed run's parameters differ"
    assert [m["step"] for m in metrics(out)] == list(range(1, 9))  # steps redone after the checkpoint logged once
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(uninterrupted)]


DDP_SCRIPT = '''
"""Under torchrun: train, then gather every rank's parameter digest and the sequences it read."""
import hashlib
import json
import sys

import numpy as np
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


from student_trainer import loader
from student_trainer.train import train
from student_trainer.settings import load_settings

seen = []
read_batches = loader.EpochReader.batches


def recording_batches(self, epoch, start_step=0):
    for batch in read_batches(self, epoch, start_step):
        for row, doc in enumerate(batch.doc_index.tolist()):
            if doc >= 0:
                seen.append([epoch, doc, np.trim_zeros(batch.input_ids[row].numpy(), "b").tobytes().hex()])
        yield batch


no_sync = [0]
ddp_no_sync = DistributedDataParallel.no_sync


def counting_no_sync(self):
    no_sync[0] += 1
    return ddp_no_sync(self)


if __name__ == "__main__":
    loader.EpochReader.batches = recording_batches
    DistributedDataParallel.no_sync = counting_no_sync
    dist.init_process_group("gloo")
    summary = train(load_settings(sys.argv[1], {}))
    digest = hashlib.sha256()
    for name, tensor in sorted(summary["model"].state_dict().items()):
        digest.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, {"digest": digest.hexdigest(), "seen": seen, "steps": summary["steps"],
                                        "no_sync": no_sync[0]})
    if dist.get_rank() == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(everything, f)
    dist.destroy_process_group()
'''


def test_ddp_on_two_cpu_processes_reads_every_sequence_once_and_keeps_parameters_in_sync(tiny_teacher, tiny_cache,
                                                                                         tmp_path):
    micro = EpochReader(tiny_cache, "train", LoaderSettings(batch_size=2, shuffle_blocks=8), 0, 2).steps_per_epoch(0)
    steps = (micro + 1) // 2  # two micro-batches per step: gradients are all-reduced on the second only (no_sync)
    # A feature phase then a KD phase: parameters that get no gradient in a step must not stall DDP.
    config = {"cache": tiny_cache, "out": str(tmp_path / "out"), "student_layers": 2, "init_from_teacher": str(tiny_teacher),
              "steps": steps, "batch_size": 2, "grad_accum": 2, "shuffle_blocks": 8, "num_workers": 0, "checkpoint_every": 0,
              "progress": False, "layer_map": "uniform", "lr": 1e-3,
              "phases": [{"name": "features", "steps": 2, "kd_weight": 0, "hidden_weight": 1},
                         {"name": "soft", "steps": steps, "hidden_weight": 0}]}
    (tmp_path / "train.yaml").write_text(json.dumps(config))  # JSON is YAML
    (tmp_path / "ddp_train.py").write_text(DDP_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "ddp_train.py"), str(tmp_path / "train.yaml"), str(tmp_path / "ranks.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    assert [r["steps"] for r in ranks] == [steps, steps]
    assert [r["no_sync"] for r in ranks] == [steps, steps], "micro-batches before the last one all-reduced gradients"
    assert ranks[0]["digest"] == ranks[1]["digest"], "the ranks' parameters drifted apart"
    read = sorted((doc, bytes.fromhex(ids)) for r in ranks for epoch, doc, ids in r["seen"] if epoch == 0)
    assert read == split_sequences(tiny_cache, "train"), "one epoch did not read every sequence exactly once"
    assert all(len(r["seen"]) > 0 for r in ranks)
    lines = metrics(tmp_path / "out")
    assert [m["phase"] for m in lines] == ["features"] * 2 + ["soft"] * (steps - 2)
    final = load_file(tmp_path / "out" / "final" / "model.safetensors")
    assert not torch.equal(final["lm_head.weight"], load_file(tiny_teacher / "model.safetensors")["lm_head.weight"])
