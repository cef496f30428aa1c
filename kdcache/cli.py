"""The `kdcache` command: one subcommand per job, each with the flags its settings dataclass defines.

Handlers check their settings first and import the package that does the work after, so `kdcache --help`, a bad
flag and a bad value answer fast. Every user error is one line on stderr and a non-zero exit: a KdError or an
environment error (disk full, permission denied) exits 2, a flag argparse cannot read exits 2 with argparse's own
one line, Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from dataclasses import dataclass

from cache_builder.settings import BuildSettings, VllmOptions
from formats.errors import KdError
from formats.schema import TOPK_ENCODINGS
from formats.settings import add_arguments, check, given, setting
from formats.topk_codec import DEFAULT_LOGPROB_BITS, MAX_LOGPROB_BITS, MIN_LOGPROB_BITS
from student_trainer.settings import EvalSettings, TrainSettings, load_settings


@dataclass
class InspectSettings:
    cache: str = setting("", "cache directory or fsspec URL", positional=True)
    json: bool = setting(False, "print the description as JSON")


@dataclass
class VerifySettings:
    cache: str = setting("", "cache directory or fsspec URL", positional=True)
    checksums: bool = setting(True, "recompute every file's sha256 (--no-checksums: faster, structure and values "
                                    "only)")


@dataclass
class ConvertSettings:
    cache: str = setting("", "source cache directory or fsspec URL", positional=True)
    out: str = setting("", "new cache directory", required=True)
    to: str | None = setting(None, "target backend (default: the source's)", choices=("zarr", "parquet"))
    top_k: int | None = setting(None, "keep the first K top-k entries; the rest join the tail mass (default: all)",
                                min=0)
    drop_samples: bool = setting(False, "leave out the RS-KD samples")
    topk_encoding: str | None = setting(None, "store the top-k plain or compact (default: as the source stores it)",
                                        choices=TOPK_ENCODINGS)
    logprob_bits: int | None = setting(None, "bits per top-k log-prob code of a compact top-k (default: the "
                                             f"source's, or {DEFAULT_LOGPROB_BITS})",
                                       min=MIN_LOGPROB_BITS, max=MAX_LOGPROB_BITS)
    overwrite: bool = setting(False, "replace whatever is at --out")


@dataclass
class MergeSettings:
    out: str = setting("", "the merged cache directory; every part must be a folder inside it", positional=True)
    parts: list[str] = setting(list, "part cache directories (inside OUT)", positional=True, nargs="+")


@dataclass
class DemoSettings:
    out: str = setting("demo_out", "folder for the corpus, cache, students and report")
    quick: bool = setting(False, "a ~2-minute version (used in tests)")
    corpus: str = setting("", "your own corpus instead of the standard library's sources")
    backend: str = setting("auto", "teacher runtime for the cache", choices=("auto", "hf", "vllm"))


def cmd_build(args: argparse.Namespace) -> int:
    s = BuildSettings(**given(args, BuildSettings), vllm=given(args, VllmOptions, prefix="vllm"))
    s.validate()  # before the builder's imports (torch, transformers): a bad option is refused at once
    from cache_builder.build import run_build

    run_build(s)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from cache_builder.merge import merge_parts

    m = merge_parts(args.out, args.parts)
    t = m.totals()
    print(f"{args.out}: merged {len(args.parts)} parts, {t['shards']} shards, {t['tokens']} tokens")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from formats.summary import describe, describe_text

    d = describe(args.cache)
    print(json.dumps(d, indent=1) if args.json else describe_text(d))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from formats.verify import verify_cache

    problems = verify_cache(args.cache, checksums=args.checksums is not False)
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} problem(s) found in {args.cache}", file=sys.stderr)
        return 1
    print(f"{args.cache}: OK")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    s = ConvertSettings(**given(args, ConvertSettings))
    check(s, KdError)
    from formats.convert import convert_cache
    from formats.reader import open_cache
    from formats.schema import topk_encoding_of

    source = open_cache(s.cache).manifest
    backend = s.to or source.backend
    m = convert_cache(s.cache, backend, s.out, overwrite=s.overwrite, top_k=s.top_k, drop_samples=s.drop_samples,
                      topk_encoding=s.topk_encoding, logprob_bits=s.logprob_bits)
    enc = topk_encoding_of(m.fields)
    if (m.top_k, m.sample_draws) != (source.top_k, source.sample_draws):
        print(f"{s.out}: {m.totals()['shards']} shards written as {backend}, top-k {m.top_k}, "
              f"{m.sample_draws} RS-KD draws (derived from {s.cache})")
    elif enc is not None and enc != topk_encoding_of(source.fields):
        print(f"{s.out}: {m.totals()['shards']} shards written as {backend}, top-k {m.top_k} stored compact "
              f"({enc.logprob_bits}-bit log-prob codes, quantized from {s.cache}; top-1 exact)")
    elif enc is None and topk_encoding_of(source.fields) is not None:
        print(f"{s.out}: {m.totals()['shards']} shards written as {backend}, top-k {m.top_k} stored plain (the "
              f"decoded values of {s.cache}; the mass its codes leave out joined the tail)")
    else:
        print(f"{s.out}: {m.totals()['shards']} shards written as {backend}; content checksums match {s.cache}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    s = load_settings(args.config, given(args, TrainSettings))  # before torch is imported: a bad value answers fast
    from student_trainer.train import train

    summary = train(s)
    print(f"kdcache train: {summary['steps']} steps, {summary['tokens']} tokens in {summary['seconds']:.1f} s, "
          f"last loss {summary['last'].get('loss')} -> {summary['out']}/final")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    s = EvalSettings(**given(args, EvalSettings))
    s.validate()
    from student_trainer.evaluate import evaluate, format_table

    result = evaluate(s.student, s.cache, s.split, s.batch_size, s.device, verify=s.verify,
                      teacher_tokenizer=s.teacher_tokenizer)
    if not s.json:
        print(format_table({s.student: result}))
    print(json.dumps(result))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from kdcache.demo import run_demo

    s = DemoSettings(**given(args, DemoSettings))
    run_demo(s.out, quick=s.quick, corpus=s.corpus or None, backend=s.backend)
    return 0


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser, but a flag it cannot read is one line (`kdcache train: error: argument --steps: invalid int
    value: 'nan' (see kdcache train --help)`) instead of the usage block and then the error. Subcommands' parsers
    are made with the same class (argparse's add_subparsers uses the parent's)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Errors of the machine, not of kdcache: a full disk, a quota, a read-only or forbidden folder.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="kdcache", description="Offline knowledge distillation from a teacher cache.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler, help: str, settings=None) -> argparse.ArgumentParser:
        # No prefixes of long flags: a typo such as --topk would otherwise quietly be --topk-encoding.
        p = sub.add_parser(name, help=help, description=help, allow_abbrev=False)
        if settings is not None:
            add_arguments(p, settings)
        p.set_defaults(func=handler)
        return p

    p = command("build", cmd_build, "run a teacher once over a corpus and write a cache", BuildSettings)
    add_arguments(p.add_argument_group("vLLM engine (--backend vllm only)"), VllmOptions, prefix="vllm")
    command("merge", cmd_merge, "join caches built with --num-parts into one cache (no shard data is copied)",
            MergeSettings)
    command("inspect", cmd_inspect, "describe a cache: teacher, fields, splits, sizes", InspectSettings)
    command("verify", cmd_verify, "check checksums, schema and value invariants of a cache", VerifySettings)
    command("convert", cmd_convert, "rewrite a cache with the other storage backend, or derive a smaller one",
            ConvertSettings)
    p = command("train", cmd_train, "train a student from a cache (no teacher in memory)")
    p.add_argument("--config", help="YAML file of training settings (the flags below override it)")
    add_arguments(p, TrainSettings)
    command("eval", cmd_eval, "compare a student with the cached teacher on a split", EvalSettings)
    command("demo", cmd_demo, "cache the embedded teacher over real text, distill a student, compare with CE only",
            DemoSettings)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the subcommand that did not know them ("kdcache build: error: ..."), not by "kdcache"
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.func(args) or 0)
    except KdError as e:
        print(f"kdcache {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise  # anything else is a bug and keeps its traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"kdcache {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # the trainer's says where it stopped (student_trainer.errors.TrainInterrupted)
        print(f"kdcache {args.command}: interrupted{' ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
