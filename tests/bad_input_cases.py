"""The bad-input table of issues #7 and #19: each case is a real `kdcache` command on a real bad file, folder or
setting.

Used by tests/test_bad_input.py (which asserts every row) and benchmarks/bad_input.py (which prints the table
into benchmarks/RESULTS.md), so the list lives here once.

Rules a row is held to (`Outcome.as_specified`):
- an error case exits non-zero (2, a KdError) with exactly one line on stderr, `kdcache CMD: error: ...`,
  containing the row's fragment (which names the file, line, field or setting at fault), and publishes nothing:
  no manifest at a build's --out, no folder at a training run's --out (or, where the row has a check, what the
  check allows: a user's folder left as it was, a run stopped by a full disk with no checkpoint or temporary file);
- a case that must succeed (a document longer than seq_len is split into windows; --skip-bad-records skips
  and counts; a 5-step run reaches its peak learning rate) exits 0 and passes its own check.

Faults a row can ask for: a file-size limit (writes fail with EFBIG, as on a full disk) and a lock that another
process holds while the row runs (a second `kdcache train` on a run folder in use).
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
TYPO_YAML = "stpes: 3\nlr: 0.001\n"
BUILD = ["build", "--teacher", "{teacher}", "--out", "{out}", "--top-k", "4", "--seq-len", "64",
         "--shard-tokens", "512", "--no-progress"]
TRAIN = ["train", "--cache", "{cache}", "--out", "{out}", "--steps", "1", "--batch-size", "2", "--num-workers", "0",
         "--no-progress"]
EVAL = ["eval", "--cache", "{cache}", "--split", "train", "--json"]
CONVERT = ["convert", "{cache}", "--out", "{out}"]


@dataclass(frozen=True)
class Case:
    name: str  # the wording of the case
    argv: list[str]  # `kdcache` arguments ({placeholders}: paths made by `prepare`); a repeated flag: the last wins
    expect: str  # an error case: a fragment of the one error line; a success: a fragment of stdout
    succeed: bool = False
    # Returns '' if the result at --out is right, else what is wrong; for an error case it replaces the
    # "nothing published" rule (a run that failed mid-way has a run folder; the check says what it may hold).
    check: Callable[[Path], str] | None = None
    limit_file_bytes: int = 0  # > 0: writes past this size fail with EFBIG, as a full disk fails with ENOSPC
    hold_lock: str = ""  # a lock file ({placeholders} allowed) another process holds while the case runs


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


def _lr_peak_check(out: Path) -> str:
    """A 5-step run under the default 10 warmup steps reached the peak rate (3e-4) at its last step and finished."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lr = json.loads(lines[-1])["lr"]
    if abs(lr - 3e-4) > 1e-12 or len(lines) != 5:
        return f"expected 5 steps ending at lr 3e-4, got {len(lines)} steps ending at {lr}"
    return "" if (out / "final" / "config.json").exists() else "no final folder"


def _no_checkpoint_left(out: Path) -> str:
    """A checkpoint that could not be written left no temporary folder, no checkpoint and no final folder."""
    left = [p.name for p in out.rglob("*") if ".tmp-" in p.name or p.name.startswith("step-")]
    if left:
        return f"left behind: {left}"
    return "a final folder was published" if (out / "final").exists() else ""


def _untouched_files(out: Path) -> str:
    """The user's folder got no run file (their own metrics.jsonl would have been overwritten)."""
    written = [n for n in ("metrics.jsonl", "settings.json", "kdcache_run.json", ".lock") if (out / n).exists()]
    return f"wrote {written} into the user's folder" if written else ""


def _untouched_run(out: Path) -> str:
    """The run folder another run holds still holds only what it held (its marker and lock)."""
    names = sorted(p.name for p in out.iterdir())
    return "" if names == [".lock", "kdcache_run.json"] else f"the held run folder was written to: {names}"


def _cache_intact(out: Path) -> str:
    """The source cache (reached through the symlink at --out) still verifies."""
    from formats.verify import verify_cache

    problems = verify_cache(str(out))
    return f"the source cache was damaged: {problems[:3]}" if problems else ""


def _listing_is(*names: str) -> Callable[[Path], str]:
    """The user's folder holds exactly `names`, as prepare left it."""
    def check(out: Path) -> str:
        got = sorted(p.name for p in out.iterdir())
        return "" if got == sorted(names) else f"the folder changed: {got}"
    return check


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
    # ---- issue #19
    Case("#4 build --temperature nan", [*BUILD, "--corpus", "{files}/long.txt", "--temperature", "nan"],
         "--temperature must be a finite number, got nan"),
    Case("#4 build --temperature inf", [*BUILD, "--corpus", "{files}/long.txt", "--temperature", "inf"],
         "--temperature must be a finite number, got inf"),
    Case("#4 build --temperature 0", [*BUILD, "--corpus", "{files}/long.txt", "--temperature", "0"],
         "--temperature must be positive, got 0.0"),
    Case("#5 zero positions: eval on a one-token document", [*EVAL, "--student", "{teacher}", "--cache", "{one_token}"],
         "no positions to evaluate in split 'train'"),
    Case("#5 zero positions: eval on a chat with user turns only",
         [*EVAL, "--student", "{teacher}", "--cache", "{user_only}"], "no positions to evaluate in split 'train'"),
    Case("#5 zero positions: train on a one-token document",
         [*TRAIN, "--student", "{teacher}", "--cache", "{one_token}"], "no positions to train on in split 'train'"),
    Case("#5 zero positions: train on a chat with user turns only",
         [*TRAIN, "--student", "{teacher}", "--cache", "{user_only}"], "no positions to train on in split 'train'"),
    Case("#8 train --alpha 1.5", [*TRAIN, "--student", "{teacher}", "--alpha", "1.5"],
         "alpha must be at most 1, got 1.5"),
    Case("#8 train --temperature 0", [*TRAIN, "--student", "{teacher}", "--temperature", "0"],
         "temperature must be positive, got 0.0"),
    Case("#8 train --temperature -1", [*TRAIN, "--student", "{teacher}", "--temperature", "-1"],
         "temperature must be positive, got -1.0"),
    Case("#8 train --lr -0.1", [*TRAIN, "--student", "{teacher}", "--lr", "-0.1"], "lr must be positive, got -0.1"),
    Case("#8 train --lr nan", [*TRAIN, "--student", "{teacher}", "--lr", "nan"], "lr must be a finite number, got nan"),
    Case("#8 YAML betas: [0.9]", [*TRAIN, "--student", "{teacher}", "--config", "{files}/betas.yaml"],
         "betas.yaml: betas must be a list of 2 values, got [0.9]"),
    Case("#8 YAML lr: 1e-3 (YAML 1.1 reads text)", [*TRAIN, "--student", "{teacher}", "--config", "{files}/lr.yaml"],
         "lr must be a number, got '1e-3' (YAML 1.1 reads a number like 1e-3 without a dot as text: write 1.0e-3)"),
    Case("#8 a tab in YAML", [*TRAIN, "--student", "{teacher}", "--config", "{files}/tab.yaml"],
         "tab.yaml: not valid YAML (line 2, column 1: found character '\\t' that cannot start any token; indent "
         "with spaces, not tabs)"),
    Case("#8 alpha schedule past 1 in YAML", [*TRAIN, "--student", "{teacher}", "--config", "{files}/alpha.yaml"],
         "schedule 'alpha' end must be at most 1, got 1.5"),
    Case("#11 train into a non-empty folder that is not a run",
         [*TRAIN, "--student", "{teacher}", "--out", "{files}"], "is not a kdcache training run (no kdcache_run.json)",
         check=_untouched_files),
    Case("#11 train --out names a file", [*TRAIN, "--student", "{teacher}", "--out", "{files}/typo.yaml"],
         "typo.yaml is a file, not a folder", check=lambda out: "" if out.read_text() == TYPO_YAML else "it changed"),
    Case("#11 --resume with no checkpoint", [*TRAIN, "--student", "{teacher}", "--resume"],
         "; drop --resume to start"),
    Case("#11 a second train on a run folder another run holds", [*TRAIN, "--student", "{teacher}", "--out", "{held_run}"],
         "another kdcache train is writing this run (it holds .lock)", hold_lock="{held_run}/.lock",
         check=_untouched_run),
    Case("#9 a full disk while writing a checkpoint", [*TRAIN, "--student", "{teacher}"],
         "could not write the checkpoint (File too large)", limit_file_bytes=8 << 20, check=_no_checkpoint_left),
    Case("#14 a 5-step run under the default 10 warmup steps reaches the peak lr",
         [*TRAIN, "--student", "{teacher}", "--steps", "5"], "5 steps", succeed=True, check=_lr_peak_check),
    Case("#14 train --help shows the defaults", ["train", "--help"], "(default: 0.0003)", succeed=True),
    Case("train --eval-every on a split the cache lacks", [*TRAIN, "--student", "{teacher}", "--eval-every", "1"],
         "no shards in split 'heldout' (splits: train)"),
    Case("train --report-to an unknown sink", [*TRAIN, "--student", "{teacher}", "--report-to", "mlflow"],
         "report_to: unknown sink 'mlflow'"),
    Case("train: an int flag given nan", [*TRAIN, "--student", "{teacher}", "--steps", "nan"],
         "argument --steps: invalid int value: 'nan'"),
    Case("an unknown flag", [*BUILD, "--corpus", "{files}/long.txt", "--topk", "4"],
         "unrecognized arguments: --topk 4"),
    Case("build --heldout-fraction 1", [*BUILD, "--corpus", "{files}/long.txt", "--heldout-fraction", "1"],
         "--heldout-fraction must be less than 1, got 1.0"),
    Case("build --part outside --num-parts", [*BUILD, "--corpus", "{files}/long.txt", "--num-parts", "2", "--part", "2"],
         "--part must be in [0, 2), got 2"),
    Case("build --seq-len over --max-batch-tokens",
         [*BUILD, "--corpus", "{files}/long.txt", "--max-batch-tokens", "32"], "--seq-len 64 exceeds --max-batch-tokens 32"),
    Case("build --vllm-* option with --backend hf",
         [*BUILD, "--corpus", "{files}/long.txt", "--vllm-max-num-seqs", "4"], "--vllm-max-num-seqs needs --backend vllm"),
    Case("convert --top-k -1", [*CONVERT, "--top-k", "-1"], "--top-k must be non-negative, got -1"),
    Case("convert a folder that is not a cache", [*CONVERT[:1], "{files}", *CONVERT[2:]],
         "no manifest.json; not a kdcache cache"),
    Case("#1 convert --overwrite onto a symlink to its source", [*CONVERT, "--out", "{cache_link}", "--overwrite"],
         "(through a symlink): a command never writes over what it reads", check=_cache_intact),
    Case("#2 build --overwrite with --out the corpus folder",
         [*BUILD, "--corpus", "{corpus_dir}", "--out", "{corpus_dir}", "--overwrite"],
         "never writes over what it reads", check=_listing_is("a.txt", "b.txt")),
    Case("#2 build --overwrite on a folder that is not a cache",
         [*BUILD, "--corpus", "{files}/long.txt", "--out", "{users_folder}", "--overwrite"],
         "is not empty and is not a kdcache cache", check=_listing_is("notes.txt")),
    Case("#3 build --out inside its corpus folder", [*BUILD, "--corpus", "{corpus_dir}", "--out", "{corpus_dir}/cache"],
         "cache lies inside --corpus"),
    Case("#7 a FIFO in the corpus folder", [*BUILD, "--corpus", "{fifo_dir}"], "pipe.txt: a FIFO"),
    Case("#7 a symlink loop in the corpus folder", [*BUILD, "--corpus", "{loop_dir}"], "loop.txt: a symlink loop"),
    Case("#16 a jsonl file starting with a byte-order mark", [*BUILD, "--corpus", "{files}/bom.jsonl"],
         "kdcache build:", succeed=True),
    Case("#16 an unknown chat role", [*BUILD, "--corpus", "{files}/wizard.jsonl"],
         "wizard.jsonl:1: messages[1] has role 'wizard'"),
    Case("train --out inside its cache", [*TRAIN, "--student", "{teacher}", "--out", "{cache}/run"],
         "lies inside --cache"),
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
    (files / "typo.yaml").write_text(TYPO_YAML)
    (files / "betas.yaml").write_text("betas: [0.9]\n")
    (files / "lr.yaml").write_text("lr: 1e-3\n")
    (files / "tab.yaml").write_text("steps: 3\n\tlr: 0.001\n")
    (files / "alpha.yaml").write_text("alpha: {kind: linear, start: 0.0, end: 1.5, steps: 10}\n")
    (files / "one_token.jsonl").write_text('{"input_ids": [42]}\n')
    (files / "user_only.jsonl").write_text('{"messages": [{"role": "user", "content": "Is anyone there?"}]}\n')
    (files / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"text": "a file saved by a Windows editor"}\n')
    (files / "wizard.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Make it rain."},
                                                                 {"role": "wizard", "content": "Abracadabra."}]}) + "\n")
    corpus_dir = root / "corpus-dir"  # a user's corpus folder (issue #19, cases 2 and 3)
    corpus_dir.mkdir()
    (corpus_dir / "a.txt").write_text("The first document of a small corpus.")
    (corpus_dir / "b.txt").write_text("The second document of a small corpus.")
    users_folder = root / "users-folder"
    users_folder.mkdir()
    (users_folder / "notes.txt").write_text("months of work")
    fifo_dir = root / "fifo-dir"  # case 7: reading a FIFO would wait for a writer forever
    fifo_dir.mkdir()
    (fifo_dir / "a.txt").write_text("A good document.")
    os.mkfifo(fifo_dir / "pipe.txt")
    loop_dir = root / "loop-dir"
    loop_dir.mkdir()
    (loop_dir / "a.txt").write_text("A good document.")
    (loop_dir / "loop.txt").symlink_to(loop_dir / "loop.txt")

    no_weights = root / "no-weights"
    no_weights.mkdir()
    shutil.copy(teacher / "config.json", no_weights / "config.json")

    cache = root / "cache"
    run_build(BuildSettings(teacher=str(teacher), corpus=[str(files / "long.txt")], out=str(cache), top_k=4,
                            seq_len=64, shard_tokens=512, progress=False))
    held_run = root / "held-run"  # a run folder whose lock the driver holds while a case runs (issue #19, case 11)
    held_run.mkdir()
    (held_run / "kdcache_run.json").write_text('{"kdcache": "training run", "version": 1}')
    (held_run / ".lock").touch()
    small_caches = {}
    for name in ("one_token", "user_only"):  # a split with no next-token target (issue #19, case 5)
        small_caches[name] = str(root / f"{name}-cache")
        run_build(BuildSettings(teacher=str(teacher), corpus=[str(files / f"{name}.jsonl")], out=small_caches[name],
                                top_k=4, seq_len=64, shard_tokens=512, progress=False))
    cache_link = root / "cache-link"  # case 1: `ln -s cache cache-link`
    cache_link.symlink_to(cache)
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
            "future_cache": str(future), "small_vocab": str(small), "other_tokenizer": str(other), "held_run": str(held_run),
            "cache_link": str(cache_link), "corpus_dir": str(corpus_dir), "users_folder": str(users_folder),
            "fifo_dir": str(fifo_dir), "loop_dir": str(loop_dir), **small_caches}


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
# whatever a library prints is seen), but pays ~4 s of imports once instead of once per case. A case's fault is
# set up around its fork: the driver holds a lock for it, or the child limits the size of the files it writes.
DRIVER = """
import fcntl, json, os, resource, signal, sys, traceback
import torch, transformers  # noqa: F401  (imported once, shared by every forked case)
import cache_builder.build, student_trainer.evaluate, student_trainer.train  # noqa: F401
from kdcache.cli import main

for job in json.loads(sys.stdin.read()):
    held = open(job["hold_lock"], "a+") if job.get("hold_lock") else None
    if held is not None:  # another run holds this lock while the case runs
        fcntl.flock(held, fcntl.LOCK_EX)
    pid = os.fork()
    if pid == 0:
        if held is not None:
            held.close()  # the child's copy of the descriptor must not count as its own lock
        for fd, name in ((1, job["stdout"]), (2, job["stderr"])):
            os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        if job.get("limit_file_bytes"):  # a full disk: the write fails (EFBIG) instead of the kernel killing us
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (job["limit_file_bytes"], resource.RLIM_INFINITY))
        try:
            rc = main(job["argv"])
        except SystemExit as e:  # argparse usage errors, --help
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:  # a crash: its traceback is the case's stderr, as in a process of its own
            traceback.print_exc()
            rc = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    _, status = os.waitpid(pid, 0)
    if held is not None:
        held.close()
    with open(job["returncode"], "w") as f:
        f.write(str(os.waitstatus_to_exitcode(status)))
"""


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def run_forked(argvs: list[list[str]], root: Path, faults: list[dict] | None = None) -> list[Run]:
    """Run `kdcache ARGV` for each argv, each in a process of its own (see DRIVER); output files go in root/run-NN.
    `faults[i]`: {"limit_file_bytes": N, "hold_lock": path} for run i (either may be left out)."""
    jobs = []
    for i, argv in enumerate(argvs):
        folder = root / f"run-{i:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append({"argv": argv, **(faults[i] if faults else {}),
                     **{k: str(folder / k) for k in ("stdout", "stderr", "returncode")}})
    proc = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(jobs), capture_output=True, text=True,
                          timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"the kdcache driver failed: {proc.stderr[-2000:]}")
    return [Run(int(Path(j["returncode"]).read_text()), Path(j["stdout"]).read_text(), Path(j["stderr"]).read_text())
            for j in jobs]


def run_cases(cases: list[Case], paths: dict[str, str], root: Path) -> list[Outcome]:
    """Run every case in its own process and folder root/case-NN (its --out is root/case-NN/out unless the case
    gives another: the last --out of its arguments is the one judged)."""
    outs = [root / f"case-{i:02d}" / "out" for i in range(len(cases))]
    argvs = [[a.format(out=out, **paths) for a in case.argv] for case, out in zip(cases, outs)]
    outs = [Path(argv[len(argv) - 1 - argv[::-1].index("--out") + 1]) if "--out" in argv else out
            for argv, out in zip(argvs, outs)]
    faults = [{"limit_file_bytes": case.limit_file_bytes, "hold_lock": case.hold_lock.format(**paths)} for case in cases]
    runs = run_forked(argvs, root, faults)
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
    elif case.check is not None:
        problem = case.check(out)
    elif (out / "manifest.json").exists() or (command == "train" and out.exists()):
        problem = f"something was published at {out}"
    return Outcome(case, returncode, lines, stdout, problem)
