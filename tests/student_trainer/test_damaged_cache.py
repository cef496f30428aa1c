"""`kdcache train` and `kdcache eval` refuse a damaged cache before they start, in one line naming the shard
(issue #7, Faults: shard damage).

Each case damages a copy of the tiny cache as a disk, a copy or a person would: a truncated shard, a missing
shard, an unknown extra file, a manifest whose counts disagree with a shard, and a flipped byte. All but the
flipped byte are found by the fast start-up check, which reads no shard data (file sizes, the Parquet footer,
the directory listing); a flipped byte keeps every size, so only `--verify` (every checksum) finds it.

An unknown extra file is refused too, as `kdcache verify` reports it: a shard-like file the manifest does not
name is most likely data someone copied in by hand, which training would silently leave out.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.bad_input_cases import Run, run_forked

pytestmark = pytest.mark.integration

SHARD = "shards/train-00001.parquet"


def recount(m: dict) -> None:
    """Make the manifest's splits and totals agree with its shard list again, as a careful forger would."""
    splits: dict = {}
    for s in m["shards"]:
        d = splits.setdefault(s["split"], {"sequences": 0, "tokens": 0, "shards": 0})
        d["sequences"] += s["sequences"]
        d["tokens"] += s["tokens"]
        d["shards"] += 1
    m["splits"] = splits
    m["totals"] = {k: sum(s[k] for s in m["shards"]) for k in ("sequences", "tokens", "bytes")}
    m["totals"]["shards"] = len(m["shards"])


def edit_shard_entry(cache: Path, key: str, delta: int) -> None:
    m = json.loads((cache / "manifest.json").read_text())
    entry = next(s for s in m["shards"] if s["path"] == SHARD)
    entry[key] += delta
    recount(m)
    (cache / "manifest.json").write_text(json.dumps(m))


def truncate(cache: Path) -> None:
    path = cache / SHARD
    path.write_bytes(path.read_bytes()[:-100])


def flip_byte(cache: Path) -> None:
    path = cache / SHARD
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # in the middle of the column data: the size stays, the footer still parses
    path.write_bytes(bytes(data))


DAMAGE = {
    # case: (damage, extra arguments, what the one error line must say)
    "truncated shard": (truncate, [], rf"shard '{SHARD}' file '{SHARD}' has \d+ bytes, the manifest says \d+"),
    "missing shard": (lambda c: (c / SHARD).unlink(), [], rf"shard '{SHARD}' is missing file '{SHARD}'"),
    "extra unknown file": (lambda c: shutil.copy(c / SHARD, c / "shards/train-09999.parquet"), [],
                           r"unknown extra file 'shards/train-09999.parquet'"),
    "manifest sequences disagree": (lambda c: edit_shard_entry(c, "sequences", 1), [],
                                    rf"shard '{SHARD}' holds \d+ sequences, the manifest says \d+"),
    "manifest tokens disagree": (lambda c: edit_shard_entry(c, "tokens", 7), [],
                                 rf"shard '{SHARD}' holds \d+ tokens, the manifest says \d+"),
    "flipped byte (--verify)": (flip_byte, ["--verify"], rf"shard '{SHARD}': file '{SHARD}' sha256 mismatch"),
}


@pytest.fixture(scope="module")
def refusals(tiny_cache, tiny_teacher, tmp_path_factory) -> dict[tuple[str, str], tuple[Run, Path]]:
    """(case, command) -> the run of `kdcache train` / `kdcache eval` on a copy of the tiny cache with that damage,
    and the training run's --out. All runs share one driver process (a forked process each)."""
    root = tmp_path_factory.mktemp("damaged")
    argvs, keys = [], []
    for i, (case, (damage, extra, _)) in enumerate(DAMAGE.items()):
        cache = Path(shutil.copytree(tiny_cache, root / f"cache-{i}"))
        assert (cache / SHARD).exists(), "the tiny cache has fewer train shards than this test damages"
        damage(cache)
        out = root / f"run-out-{i}"
        argvs.append(["train", "--cache", str(cache), "--out", str(out), "--student-layers", "1", "--init-from-teacher",
                      str(tiny_teacher), "--steps", "1", "--batch-size", "2", "--num-workers", "0", "--no-progress",
                      *extra])
        argvs.append(["eval", "--student", str(tiny_teacher), "--cache", str(cache), "--split", "train", "--json", *extra])
        keys += [(case, "train", out), (case, "eval", None)]
    runs = run_forked(argvs, root / "runs")
    return {(case, command): (run, out) for (case, command, out), run in zip(keys, runs)}


def assert_refused(run: Run, command: str, message: str, out: Path | None) -> None:
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr[-2000:]
    assert lines[0].startswith(f"kdcache {command}: error:") and re.search(message, lines[0]), lines[0]
    assert run.stdout == ""
    if out is not None:
        assert not out.exists(), "a refused run must not start writing its output"


@pytest.mark.parametrize("case", list(DAMAGE))
def test_train_refuses_a_damaged_cache_at_start_naming_the_shard(refusals, case):
    run, out = refusals[(case, "train")]
    assert_refused(run, "train", DAMAGE[case][2], out)


@pytest.mark.parametrize("case", list(DAMAGE))
def test_eval_refuses_a_damaged_cache_at_start_naming_the_shard(refusals, case):
    run, _ = refusals[(case, "eval")]
    assert_refused(run, "eval", DAMAGE[case][2], None)


def test_verify_reports_every_kind_of_damage_the_trainer_refuses(tiny_cache, tmp_path):
    """The same damage, all in one cache: verify lists each (the trainer stops at the first)."""
    from formats.verify import verify_cache

    cache = Path(shutil.copytree(tiny_cache, tmp_path / "cache"))
    m = json.loads((cache / "manifest.json").read_text())
    train_shards = [s["path"] for s in m["shards"] if s["split"] == "train"]
    assert len(train_shards) >= 4
    a, b, c, d = train_shards[:4]
    Path(cache / a).write_bytes((cache / a).read_bytes()[:-100])
    (cache / b).unlink()
    data = bytearray((cache / c).read_bytes())
    data[len(data) // 2] ^= 0x01
    (cache / c).write_bytes(bytes(data))
    (cache / "shards" / "stray.parquet").write_bytes(b"not named by the manifest")
    next(s for s in m["shards"] if s["path"] == d)["sequences"] += 1
    recount(m)
    (cache / "manifest.json").write_text(json.dumps(m))
    problems = "\n".join(verify_cache(str(cache)))
    assert f"shard '{a}': file '{a}' has" in problems
    assert f"shard '{b}': file '{b}' is missing" in problems
    assert f"shard '{c}': file '{c}' sha256 mismatch" in problems
    assert "unknown extra file 'shards/stray.parquet'" in problems
    assert f"shard '{d}' holds" in problems and "sequences, the manifest says" in problems
