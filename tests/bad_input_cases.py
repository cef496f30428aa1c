"""The bad-input table of issue #7: each case is a real `kdcache` command on a real bad file, folder or setting.

Used by tests/test_bad_input.py (which asserts every row) and benchmarks/bad_input.py (which prints the table
into benchmarks/RESULTS.md), so the list lives here once.

Rules a row is held to (`Outcome.as_specified`):
- an error case exits non-zero (2, a KdError) with exactly one line on stderr, `kdcache CMD: error: ...`,
  containing the row's fragment (which names the file, line, field or setting at fault), and publishes nothing:
  no manifest at a build's --out, no folder at a training run's --out;
- a case that must succeed (a document longer than seq_len is split into windows; --skip-bad-records skips
  and counts) exits 0 and passes its own check.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

STDLIB = Path(os.__file__).parent
BUILD = ["build", "--teacher", "{teacher}", "--out", "{out}", "--top-k", "4", "--seq-len", "64",
         "--shard-tokens", "512", "--no-progress"]
TRAIN = ["train", "--cache", "{cache}", "--out", "{out}", "--steps", "1", "--batch-size", "2", "--num-workers", "0",
         "--no-progress"]
EVAL = ["eval", "--cache", "{cache}", "--split", "train", "--json"]


@dataclass(frozen=True)
class Case:
    name: str  # the wording of the case
    argv: list[str]  # `kdcache` arguments ({placeholders}: paths made by `prepare`); a repeated flag: the last wins
    expect: str  # an error case: a fragment of the one error line; a success: a fragment of stdout
    succeed: bool = False
    check: Callable[[Path], str] | None = None  # a success: returns '' if the result is right, else what is wrong


def _windows_check(out: Path) -> str:
    """The long document became several sequences of at most seq_len tokens, all of document 0."""
    from formats.reader import open_cache

    cache = open_cache(out, require_complete=True)
    seqs = [cache.sequence(i) for i in range(cache.num_sequences())]
    lengths = [len(s["input_ids"]) for s in seqs]
    docs = {int(s["doc_index"]) for s in seqs}
    if len(seqs) < 2 or max(lengths) > 64 or docs != {0}:
        return f"expected several windows of <= 64 tokens of document 0, got lengths {lengths}, documents {docs}"
    return ""


def _skipped_check(out: Path) -> str:
    from formats.reader import open_cache

    n = open_cache(out, require_complete=True).num_sequences()
    return "" if n >= 2 else f"expected the two good records to be cached, got {n} sequences"


CASES = [
    Case("empty corpus", [*BUILD, "--corpus", "{files}/empty.txt"], "empty.txt']: no documents found"),
    Case("malformed JSON line", [*BUILD, "--corpus", "{files}/bad.jsonl"], "bad.jsonl:2: malformed JSON (Unterminated string"),
    Case("malformed JSON line, --skip-bad-records", [*BUILD, "--corpus", "{files}/bad.jsonl", "--skip-bad-records"],
         "skipped 1 malformed record(s)", succeed=True, check=_skipped_check),
    Case("missing text field", [*BUILD, "--corpus", "{files}/no_text.jsonl"], "no_text.jsonl:1: no field 'text'"),
    Case("non-UTF-8 bytes", [*BUILD, "--corpus", "{files}/latin1.txt"], "latin1.txt:2: not valid UTF-8"),
    Case("document longer than seq_len", [*BUILD, "--corpus", "{files}/long.txt"],
         "1 document(s) longer than --seq-len 64 were split into windows", succeed=True,
         check=_windows_check),
    Case("top-k larger than the vocab", [*BUILD, "--corpus", "{files}/long.txt", "--top-k", "100000"],
         "--top-k 100000 is larger than the teacher's vocabulary"),
    Case("hidden layer out of range", [*BUILD, "--corpus", "{files}/long.txt", "--hidden-layers", "7"],
         "--hidden-layers: layer 7 is out of range"),
    Case("teacher folder missing", [*BUILD, "--corpus", "{files}/long.txt", "--teacher", "{files}/no-such-teacher"],
         "no-such-teacher': no such folder"),
    Case("teacher folder without weights", [*BUILD, "--corpus", "{files}/long.txt", "--teacher", "{no_weights}"],
         "no-weights': no weight files"),
    Case("student vocab smaller than the cache's ids (train)", [*TRAIN, "--student", "{small_vocab}"],
         "student has 1000 output rows, fewer than the cache's vocabulary (49152)"),
    Case("student vocab smaller than the cache's ids (eval)", [*EVAL, "--student", "{small_vocab}"],
         "has 1000 output rows, fewer than the cache's vocabulary (49152)"),
    Case("tokenizer mismatch (train)", [*TRAIN, "--student", "{other_tokenizer}"],
         "differs from the cache's (49152 tokens"),
    Case("tokenizer mismatch (eval)", [*EVAL, "--student", "{other_tokenizer}"],
         "its tokenizer differs from the cache's teacher tokenizer"),
    Case("unknown format version", [*TRAIN, "--student", "{teacher}", "--cache", "{future_cache}"],
         "manifest.json: cache format version 2.0.0 is not supported"),
    Case("config key misspelled", [*TRAIN, "--student", "{teacher}", "--config", "{files}/typo.yaml"],
         "typo.yaml: unknown key 'stpes'"),
    Case("zero size: build --shard-tokens 0", [*BUILD, "--corpus", "{files}/long.txt", "--shard-tokens", "0"],
         "--shard-tokens must be positive, got 0"),
    Case("negative size: build --seq-len -8", [*BUILD, "--corpus", "{files}/long.txt", "--seq-len", "-8"],
         "--seq-len must be positive, got -8"),
    Case("zero size: train --batch-size 0", [*TRAIN, "--student", "{teacher}", "--batch-size", "0"],
         "batch_size must be positive, got 0"),
    Case("zero size: eval --batch-size 0", [*EVAL, "--student", "{teacher}", "--batch-size", "0"],
         "--batch-size must be positive, got 0"),
]


def prepare(root: Path) -> dict[str, str]:
    """Every file the cases name, under `root`: a tiny teacher, a cache it built, students, bad corpora."""
    from cache_builder.build import run_build
    from cache_builder.default_teacher import default_teacher_dir
    from cache_builder.settings import BuildSettings
    from tests.cache_builder.tiny_teacher import TOKENIZER_FILES, make_tiny_teacher

    tokenizer_dir = default_teacher_dir()
    teacher = make_tiny_teacher(root / "teacher", tokenizer_dir)
    files = root / "files"
    files.mkdir()
    (files / "empty.txt").write_text("")
    (files / "bad.jsonl").write_text('{"text": "one good record"}\n{"text": "cut short\n{"text": "another good one"}\n')
    (files / "no_text.jsonl").write_text('{"body": "the text is under another name"}\n')
    (files / "latin1.txt").write_bytes("first line\nna\u00efve caf\u00e9\n".encode("latin-1"))
    (files / "long.txt").write_text((STDLIB / "textwrap.py").read_text(encoding="utf-8")[:2000])
    (files / "typo.yaml").write_text("stpes: 3\nlr: 0.001\n")

    no_weights = root / "no-weights"
    no_weights.mkdir()
    shutil.copy(teacher / "config.json", no_weights / "config.json")

    cache = root / "cache"
    run_build(BuildSettings(teacher=str(teacher), corpus=[str(files / "long.txt")], out=str(cache), top_k=4,
                            seq_len=64, shard_tokens=512, progress=False))
    future = Path(shutil.copytree(cache, root / "future-cache"))
    manifest = json.loads((future / "manifest.json").read_text())
    manifest["format_version"] = "2.0.0"
    (future / "manifest.json").write_text(json.dumps(manifest))

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    small = root / "small-vocab"
    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=1, num_key_value_heads=1, head_dim=64)).save_pretrained(small)
    for name in TOKENIZER_FILES:  # the teacher's tokenizer, so only the vocabulary size is wrong
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, small / name)
    other = Path(shutil.copytree(teacher, root / "other-tokenizer"))
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<kdcache-extra-token>"])
    tok.save_pretrained(other)
    return {"teacher": str(teacher), "files": str(files), "no_weights": str(no_weights), "cache": str(cache),
            "future_cache": str(future), "small_vocab": str(small), "other_tokenizer": str(other)}


@dataclass
class Outcome:
    case: Case
    returncode: int
    stderr_lines: list[str]
    stdout: str
    problem: str  # '' when the case behaved as specified, else what was wrong

    @property
    def as_specified(self) -> bool:
        return self.problem == ""

    @property
    def shown(self) -> str:
        """What a user sees: the error line, or the last line of a success."""
        if self.case.succeed and self.returncode == 0:
            return self.stdout.strip().splitlines()[-1] if self.stdout.strip() else ""
        return self.stderr_lines[-1] if self.stderr_lines else ""


# One process imports kdcache's heavy modules once, then forks a child per case: each case still runs
# `kdcache.cli.main` in a process of its own, with its stdout and stderr captured at the file descriptors (so
# whatever a library prints is seen), but pays ~4 s of imports once instead of twenty times.
DRIVER = """
import json, os, sys, traceback
import torch, transformers  # noqa: F401  (imported once, shared by every forked case)
import cache_builder.build, student_trainer.evaluate, student_trainer.train  # noqa: F401
from kdcache.cli import main

for job in json.loads(sys.stdin.read()):
    pid = os.fork()
    if pid == 0:
        for fd, name in ((1, job["stdout"]), (2, job["stderr"])):
            os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        try:
            rc = main(job["argv"])
        except SystemExit as e:  # argparse usage errors
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:  # a crash: its traceback is the case's stderr, as in a process of its own
            traceback.print_exc()
            rc = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    _, status = os.waitpid(pid, 0)
    with open(job["returncode"], "w") as f:
        f.write(str(os.waitstatus_to_exitcode(status)))
"""


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def run_forked(argvs: list[list[str]], root: Path) -> list[Run]:
    """Run `kdcache ARGV` for each argv, each in a process of its own (see DRIVER); output files go in root/run-NN."""
    jobs = []
    for i, argv in enumerate(argvs):
        folder = root / f"run-{i:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append({"argv": argv, **{k: str(folder / k) for k in ("stdout", "stderr", "returncode")}})
    proc = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(jobs), capture_output=True, text=True,
                          timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"the kdcache driver failed: {proc.stderr[-2000:]}")
    return [Run(int(Path(j["returncode"]).read_text()), Path(j["stdout"]).read_text(), Path(j["stderr"]).read_text())
            for j in jobs]


def run_cases(cases: list[Case], paths: dict[str, str], root: Path) -> list[Outcome]:
    """Run every case in its own process and folder root/case-NN (its --out is root/case-NN/out)."""
    outs = [root / f"case-{i:02d}" / "out" for i in range(len(cases))]
    argvs = [[a.format(out=out, **paths) for a in case.argv] for case, out in zip(cases, outs)]
    runs = run_forked(argvs, root)
    return [_judge(case, argv[0], run, out) for case, argv, run, out in zip(cases, argvs, runs, outs)]


def _judge(case: Case, command: str, run: Run, out: Path) -> Outcome:
    returncode, stdout, stderr = run.returncode, run.stdout, run.stderr
    lines = stderr.strip().splitlines()
    problem = ""
    if case.succeed:
        if returncode != 0:
            problem = f"exit {returncode}: {stderr.strip()[-500:]}"
        elif case.expect not in stdout:
            problem = f"stdout lacks {case.expect!r}"
        elif case.check is not None:
            problem = case.check(out)
    elif returncode == 0:
        problem = "exit 0: the bad input was accepted"
    elif len(lines) != 1:
        problem = f"{len(lines)} lines on stderr, want 1: {stderr.strip()[-500:]}"
    elif not lines[0].startswith(f"kdcache {command}: error:"):
        problem = f"not a kdcache error line: {lines[0]}"
    elif case.expect not in lines[0]:
        problem = f"the error line lacks {case.expect!r}"
    elif (out / "manifest.json").exists() or (command == "train" and out.exists()):
        problem = f"something was published at {out}"
    return Outcome(case, returncode, lines, stdout, problem)
