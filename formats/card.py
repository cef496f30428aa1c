"""The README.md card written into every finished cache, for the people it is shared with: a Hugging Face dataset
card (YAML `configs`, one split per cache split, so `datasets.load_dataset(CACHE_DIR)` gives each split) and
snippets for pandas, DuckDB, polars, datasets (Parquet) or zarr and xarray (Zarr) that handle the NaN last
position of `target_logprob` and BF16 values stored as uint16 bits. tests/formats/test_data_tools.py runs them."""

from __future__ import annotations

import json

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


def front_matter(m: Manifest) -> list[str]:
    """The dataset card's YAML: for Parquet, a `configs` entry whose splits list each split's shard files (JSON is
    YAML, so every value is written as JSON text); Zarr shards are not a format `datasets` reads."""
    lines = ["---", "tags:", "- kdcache", "- knowledge-distillation"]
    if m.backend == "parquet" and m.shards:
        lines += ["configs:", "- config_name: default", "  data_files:"]
        for split in m.splits():
            lines += [f"  - split: {split}", "    path:"]
            lines += [f"    - {json.dumps(s.path)}" for s in m.split_shards(split)]
    return lines + ["---", ""]


def _bf16_fields(m: Manifest) -> list[str]:
    return [n for n, spec in m.fields.items() if spec.dtype == "BF16"]


def snippets(m: Manifest) -> list[str]:
    """Markdown: how to open the cache with the usual tools, run from the cache's folder."""
    first = m.split_shards(next(iter(m.splits()), None))
    split = first[0].split if first else "train"
    files = [s.path for s in m.split_shards(split)]
    bf16 = _bf16_fields(m)
    if not files:
        return ["## Open it without kdcache", "", "The cache holds no shards.", ""]
    lines = ["## Open it without kdcache", "",
             "From this folder (fetch a remote cache first: `kdcache copy URL DIR`). `target_logprob` is NaN at the "
             "last position of every sequence (its next token is not in the window): use nan-aware means. BF16 "
             "values are stored as their raw uint16 bits: widen them to float32 with "
             "`(bits.astype(np.uint32) << 16).view(np.float32)`.", ""]
    if m.backend == "parquet":
        lines += ["```python", "import pyarrow.parquet as pq",
                  f"table = pq.read_table({files[0]!r})  # one row per sequence",
                  "print(table.schema); row = table.slice(0, 1).to_pylist()[0]", "```", "",
                  "```python", "import os", "from datasets import load_dataset",
                  "ds = load_dataset(os.path.abspath('.'))  # one split per cache split, from this card's configs",
                  "print({name: len(d) for name, d in ds.items()})  # sequences per split", "```", "",
                  "```python", "import numpy as np", "import pandas as pd",
                  f"df = pd.read_parquet({files!r})  # split {split!r}: one row per sequence",
                  "target = np.concatenate(df['target_logprob'].to_numpy())",
                  "print('mean target log-prob', np.nanmean(target))  # NaN at each last position", "```", "",
                  "```python", "import duckdb",
                  f"files = {files!r}",
                  "query = ('SELECT avg(x) FROM (SELECT unnest(target_logprob) AS x FROM read_parquet($f)) '",
                  "         'WHERE NOT isnan(x)')  # leave out the NaN last positions",
                  "print(duckdb.execute(query, {'f': files}).fetchone())", "```", "",
                  "```python", "import polars as pl",
                  f"df = pl.read_parquet({files!r})",
                  "print(df.select(pl.col('target_logprob').explode().fill_nan(None).mean()))", "```", ""]
        if bf16:
            name = bf16[0]
            lines += ["```python", "import numpy as np", "import pyarrow.compute as pc", "import pyarrow.parquet as pq",
                      f"col = pq.read_table({files[0]!r}, columns=[{name!r}]).column({name!r}).combine_chunks()",
                      "bits = col.flatten()", "while hasattr(bits, 'flatten'):  # lists of (lists of) uint16",
                      "    bits = bits.flatten()",
                      "values = (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)",
                      f"print({name!r}, 'as float32:', values[:4])", "```", ""]
    else:
        path = files[0]
        lines += ["```python", "import zarr",
                  f"g = zarr.open_group({path!r}, mode='r')  # flat token axis + seq_offsets",
                  "off = g['seq_offsets'][:]; ids = g['input_ids'][off[0]:off[1]]  # sequence 0", "```", "",
                  "```python", "import numpy as np", "import xarray as xr",
                  f"ds = xr.open_zarr({path!r}, consolidated=False)",
                  "print('mean target log-prob', np.nanmean(ds['target_logprob'].values))  # NaN at each last position",
                  "```", ""]
        if bf16:
            name = bf16[0]
            lines += ["```python", "import numpy as np", "import zarr",
                      f"bits = zarr.open_group({path!r}, mode='r')[{name!r}][:]",
                      "values = (bits.astype(np.uint32) << 16).view(np.float32)",
                      f"print({name!r}, 'as float32:', values.reshape(-1)[:4])", "```", ""]
    return lines


def render_card(m: Manifest) -> str:
    t, b, totals = m.teacher, m.build, m.totals()
    lines = front_matter(m) + [
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
    lines += ["", "BF16 values are stored as their raw uint16 bits.", ""] + snippets(m)
    lines += ["With kdcache: `kdcache inspect .` and `kdcache verify .`", ""]
    return "\n".join(lines)
