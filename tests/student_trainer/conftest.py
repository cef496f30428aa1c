"""Fixtures for the trainer tests: a tiny random teacher and two small caches it built, once per session.

`tiny_cache`: Parquet, top-k 8, 16 RS-KD draws, hidden layers 1 and 2, held-out split, ~300-token shards
(several shards per split, one read block each). `packed_cache`: Zarr, packed documents (position_ids),
BF16 top-k log-probs and F16 hidden states, so the loader meets the other backend and dtypes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cache_builder.build import run_build
from cache_builder.settings import BuildSettings

STDLIB = Path(os.__file__).parent
CORPUS_FILES = ["colorsys.py", "textwrap.py", "json/decoder.py", "bisect.py", "heapq.py", "keyword.py", "fnmatch.py",
                "glob.py"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for name in CORPUS_FILES:
        text = (STDLIB / name).read_text(encoding="utf-8")[:1500]
        (folder / (name.replace("/", "_") + ".txt")).write_text(text, encoding="utf-8")
    return folder


def build(teacher: Path, corpus: Path, out: Path, **kw) -> str:
    base = dict(teacher=str(teacher), corpus=[str(corpus)], out=str(out), top_k=8, sample_draws=16, hidden_layers=[1, 2],
                heldout_fraction=0.3, seq_len=128, shard_tokens=300, max_batch_tokens=512, progress=False)
    base.update(kw)
    run_build(BuildSettings(**base))
    return str(out)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_teacher, corpus) -> str:
    return build(tiny_teacher, corpus, tmp_path_factory.mktemp("caches") / "tiny")


@pytest.fixture(scope="session")
def packed_cache(tmp_path_factory, tiny_teacher, corpus) -> str:
    return build(tiny_teacher, corpus, tmp_path_factory.mktemp("caches") / "packed", packing=True, seq_len=256,
                 txt_split="paragraphs", format="zarr", logprob_dtype="bf16", hidden_dtype="fp16")
