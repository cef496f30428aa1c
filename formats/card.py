"""The README.md card written into every finished cache, for the people it is shared with."""

from __future__ import annotations

from formats.manifest import Manifest

_MEANING = {
    "input_ids": "teacher token ids",
    "topk_ids": "top-k next-token ids, most probable first",
    "topk_logprobs": "their log-probabilities",
    "tail_logmass": "log of the probability mass outside the top k",
    "target_logprob": "log-probability of the actual next token (NaN at the last position)",
    "loss_mask": "1 where the token is a training target",
    "position_ids": "restart at 0 at each packed document",
    "byte_offsets": "[start, end) UTF-8 byte offsets into the document text",
    "sample_ids": "RS-KD sampled ids (padded with -1)",
    "sample_counts": "how often each sampled id was drawn",
    "doc_index": "corpus index of the sequence's first document",
}


def bytes_per_token(m: Manifest) -> dict[str, float]:
    """Uncompressed bytes each field stores per token (sequence fields spread over the tokens)."""
    tokens = max(1, m.totals()["tokens"])
    sequences = m.totals()["sequences"]
    out = {}
    for name, spec in m.fields.items():
        width = spec.np_dtype.itemsize * (spec.shape[0] if spec.shape else 1)
        out[name] = width if spec.per == "token" else width * sequences / tokens
    return out


def _logprob_storage(m: Manifest) -> str:
    """'F32', or for a compact top-k 'compact 6-bit codes (top-1 F32)'."""
    enc = m.fields["topk_ids"].encoding
    if enc is None:
        return m.fields["topk_logprobs"].dtype
    return f"compact {enc.logprob_bits}-bit codes (top-1 and tail exact; SPEC.md \"Compact top-k\")"


def render_card(m: Manifest) -> str:
    t, b, totals = m.teacher, m.build, m.totals()
    first = m.shards[0].path if m.shards else "shards/train-00000" + (".parquet" if m.backend == "parquet" else ".zarr")
    lines = [
        "# kdcache cache",
        "",
        f"Teacher outputs cached by {m.created_by or 'kdcache'} in kdcache format {m.format_version} "
        f"({m.backend} backend). `manifest.json` is the authoritative description; this card is generated from it.",
        "",
        "| | |",
        "|---|---|",
        f"| teacher | {t.get('name', '?')} ({t.get('backend', '?')} {t.get('backend_version', '')}, {t.get('dtype', '?')}) |",
        f"| tokenizer vocab | {m.vocab_size} |",
        f"| corpus | {len(m.corpus.get('sources', []))} source(s), fingerprint {str(m.corpus.get('sha256', ''))[:16]} |",
        f"| top-k | {m.top_k}, log-probs in {_logprob_storage(m)}, temperature {b.get('temperature')} |"
        if m.top_k else f"| top-k | none (samples-only RS-KD cache), temperature {b.get('temperature')} |",
        f"| RS-KD draws | {m.sample_draws or 'none'} |",
        f"| hidden layers | {', '.join(n[7:] for n in m.fields if n.startswith('hidden/')) or 'none'} |",
        f"| sequences / tokens | {totals['sequences']} / {totals['tokens']} |",
        f"| shards / bytes | {totals['shards']} / {totals['bytes']} ({totals['bytes'] / max(1, totals['tokens']):.1f} B/token on disk) |",
        "",
        "## Splits",
        "",
    ]
    for split, s in m.splits().items():
        lines.append(f"- `{split}`: {s['sequences']} sequences, {s['tokens']} tokens, {s['shards']} shards")
    lines += ["", "## Fields", "", "| field | per | dtype | shape | bytes/token | meaning |", "|---|---|---|---|---|---|"]
    bpt = bytes_per_token(m)
    for name, spec in m.fields.items():
        meaning = _MEANING.get(name, "teacher hidden state" if name.startswith("hidden/") else "")
        lines.append(f"| `{name}` | {spec.per} | {spec.dtype} | {list(spec.shape)} | {bpt[name]:.1f} | {meaning} |")
    lines += ["", "BF16 values are stored as their raw uint16 bits.", "", "## Open it without kdcache", "", "```python"]
    if m.backend == "parquet":
        lines += [
            "import pyarrow.parquet as pq",
            f"table = pq.read_table('{first}')  # one row per sequence",
            "print(table.schema); row = table.slice(0, 1).to_pylist()[0]",
        ]
    else:
        lines += [
            "import zarr",
            f"g = zarr.open_group('{first}', mode='r')  # flat token axis + seq_offsets",
            "off = g['seq_offsets'][:]; ids = g['input_ids'][off[0]:off[1]]  # sequence 0",
        ]
    lines += ["```", "", "With kdcache: `kdcache inspect .` and `kdcache verify .`", ""]
    return "\n".join(lines)
