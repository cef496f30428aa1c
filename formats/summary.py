"""What `kdcache inspect` shows of a cache: teacher, fields, splits, sizes, as a dict and as text."""

from __future__ import annotations

from formats.card import bytes_per_token
from formats.reader import open_cache


def describe(url: str) -> dict:
    """The cache at `url` described from its manifest alone (no shard is read)."""
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


def describe_text(d: dict) -> str:
    """`describe`'s dict as the lines `kdcache inspect` prints."""
    t = d["teacher"]
    lines = [
        f"cache      {d['cache']}  (kdcache format {d['format_version']}, {d['backend']}, "
        f"{'complete' if d['complete'] else 'INCOMPLETE'})",
        f"teacher    {t.get('name')}  [{t.get('backend')} {t.get('backend_version', '')}, {t.get('dtype')}]",
        f"tokenizer  vocab {d['tokenizer']['vocab_size']}, fingerprint {str(d['tokenizer']['fingerprint'])[:16]}",
        f"top-k      {d['top_k']}{_compact(d['fields'])}    RS-KD draws {d['sample_draws'] or '-'}",
        "fields     " + ", ".join(f"{n} {f['dtype']}{f['shape'] or ''}" for n, f in d["fields"].items()),
    ]
    for split, s in d["splits"].items():
        lines.append(f"split      {split}: {s['sequences']} sequences, {s['tokens']} tokens, {s['shards']} shards")
    tot = d["totals"]
    lines.append(f"total      {tot['sequences']} sequences, {tot['tokens']} tokens, {tot['shards']} shards, "
                 f"{tot['bytes']} bytes ({d['bytes_per_token']['on_disk']} B/token on disk)")
    lines.append("bytes/token (uncompressed)  "
                 + ", ".join(f"{k} {v}" for k, v in d["bytes_per_token"]["fields_uncompressed"].items()))
    return "\n".join(lines)


def _compact(fields: dict) -> str:
    enc = fields.get("topk_ids", {}).get("encoding")
    return f" (compact, {enc['logprob_bits']}-bit log-prob codes)" if enc else ""
