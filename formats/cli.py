"""The `kdcache` command. Each package adds its own subcommands through the `kdcache.commands` entry
points (see pyproject.toml), so this dispatcher imports none of them directly and starts fast: heavy
modules are imported inside the command handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points

from formats.errors import KdError


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="describe a cache: teacher, fields, splits, sizes")
    p.add_argument("cache", help="cache directory or fsspec URL")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check checksums, schema and value invariants of a cache")
    p.add_argument("cache", help="cache directory or fsspec URL")
    p.add_argument("--no-checksums", action="store_true", help="skip recomputing file sha256 (faster)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("convert", help="rewrite a cache with the other storage backend, or derive a smaller one")
    p.add_argument("cache", help="source cache directory or fsspec URL")
    p.add_argument("--to", choices=("zarr", "parquet"), help="target backend (default: the source's)")
    p.add_argument("--out", required=True, help="new cache directory")
    p.add_argument("--top-k", type=int, help="keep the first K top-k entries; the rest join the tail mass")
    p.add_argument("--drop-samples", action="store_true", help="leave out the RS-KD samples")
    p.add_argument("--overwrite", action="store_true", help="replace whatever is at --out")
    p.set_defaults(func=cmd_convert)


def describe(url: str) -> dict:
    from formats.card import bytes_per_token
    from formats.reader import open_cache

    m = open_cache(url).manifest
    totals = m.totals()
    return {
        "cache": url,
        "format_version": m.format_version,
        "complete": m.complete,
        "backend": m.backend,
        "teacher": m.teacher,
        "tokenizer": {k: m.tokenizer.get(k) for k in ("fingerprint", "vocab_size", "special_ids")},
        "top_k": m.top_k,
        "sample_draws": m.sample_draws,
        "fields": {name: spec.to_json() for name, spec in m.fields.items()},
        "bytes_per_token": {
            "fields_uncompressed": {k: round(v, 3) for k, v in bytes_per_token(m).items()},
            "on_disk": round(totals["bytes"] / max(1, totals["tokens"]), 3),
        },
        "splits": m.splits(),
        "totals": totals,
        "shards": [{"path": s.path, "split": s.split, "sequences": s.sequences, "tokens": s.tokens, "bytes": s.bytes}
                   for s in m.shards],
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    d = describe(args.cache)
    if args.json:
        print(json.dumps(d, indent=1))
        return 0
    t = d["teacher"]
    print(f"cache      {d['cache']}  (kdcache format {d['format_version']}, {d['backend']}, "
          f"{'complete' if d['complete'] else 'INCOMPLETE'})")
    print(f"teacher    {t.get('name')}  [{t.get('backend')} {t.get('backend_version', '')}, {t.get('dtype')}]")
    print(f"tokenizer  vocab {d['tokenizer']['vocab_size']}, fingerprint {str(d['tokenizer']['fingerprint'])[:16]}")
    print(f"top-k      {d['top_k']}    RS-KD draws {d['sample_draws'] or '-'}")
    print("fields     " + ", ".join(f"{n} {f['dtype']}{f['shape'] or ''}" for n, f in d["fields"].items()))
    for split, s in d["splits"].items():
        print(f"split      {split}: {s['sequences']} sequences, {s['tokens']} tokens, {s['shards']} shards")
    tot = d["totals"]
    print(f"total      {tot['sequences']} sequences, {tot['tokens']} tokens, {tot['shards']} shards, "
          f"{tot['bytes']} bytes ({d['bytes_per_token']['on_disk']} B/token on disk)")
    print("bytes/token (uncompressed)  " + ", ".join(f"{k} {v}" for k, v in d["bytes_per_token"]["fields_uncompressed"].items()))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from formats.verify import verify_cache

    problems = verify_cache(args.cache, checksums=not args.no_checksums)
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} problem(s) found in {args.cache}", file=sys.stderr)
        return 1
    print(f"{args.cache}: OK")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from formats.convert import convert_cache

    from formats.reader import open_cache

    backend = args.to or open_cache(args.cache).manifest.backend
    m = convert_cache(args.cache, backend, args.out, overwrite=args.overwrite, top_k=args.top_k,
                      drop_samples=args.drop_samples)
    if "derived_from" in m.build:
        print(f"{args.out}: {m.totals()['shards']} shards written as {backend}, top-k {m.top_k}, "
              f"{m.sample_draws} RS-KD draws (derived from {args.cache})")
    else:
        print(f"{args.out}: {m.totals()['shards']} shards written as {backend}; content checksums match {args.cache}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdcache", description="Offline knowledge distillation from a teacher cache.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for ep in sorted(entry_points(group="kdcache.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KdError as e:
        print(f"kdcache {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kdcache {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
