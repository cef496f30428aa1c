"""Caches for the trainer tests, built by the real builder from the tiny teacher: the corpus they are built from
and `build` with the tests' defaults (conftest.py's session caches and test_xtok_train.py's module cache use it)."""

from __future__ import annotations

import os
from pathlib import Path

from cache_builder.build import run_build
from cache_builder.settings import BuildSettings

STDLIB = Path(os.__file__).parent
CORPUS_FILES = ["colorsys.py", "textwrap.py", "json/decoder.py", "bisect.py", "heapq.py", "keyword.py", "fnmatch.py",
                "glob.py"]


def write_corpus(folder: Path) -> Path:
    """The first 1500 characters of a few standard-library modules, one .txt document each."""
    for name in CORPUS_FILES:
        text = (STDLIB / name).read_text(encoding="utf-8")[:1500]
        (folder / (name.replace("/", "_") + ".txt")).write_text(text, encoding="utf-8")
    return folder


def build(teacher: Path, corpus: Path, out: Path, **kw) -> str:
    """A cache of `corpus` by `teacher` at `out`: top-k 8, 16 RS-KD draws, hidden layers 1 and 2, a held-out split,
    ~300-token shards; `kw` overrides any BuildSettings field."""
    base = dict(teacher=str(teacher), corpus=[str(corpus)], out=str(out), top_k=8, sample_draws=16, hidden_layers=[1, 2],
                heldout_fraction=0.3, seq_len=128, shard_tokens=300, max_batch_tokens=512, progress=False)
    base.update(kw)
    run_build(BuildSettings(**base))
    return str(out)
