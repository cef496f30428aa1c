"""Fixtures for the trainer tests: the corpus and two small caches the tiny teacher (tests/conftest.py) built,
once per session (caches.py builds them).

`tiny_cache`: Parquet, top-k 8, 16 RS-KD draws, hidden layers 1 and 2, held-out split, ~300-token shards
(several shards per split, one read block each). `packed_cache`: Zarr, packed documents (position_ids),
BF16 top-k log-probs and F16 hidden states, so the loader meets the other backend and dtypes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.student_trainer.caches import build, write_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_teacher, corpus) -> str:
    return build(tiny_teacher, corpus, tmp_path_factory.mktemp("caches") / "tiny")


@pytest.fixture(scope="session")
def packed_cache(tmp_path_factory, tiny_teacher, corpus) -> str:
    return build(tiny_teacher, corpus, tmp_path_factory.mktemp("caches") / "packed", packing=True, seq_len=256,
                 txt_split="paragraphs", format="zarr", logprob_dtype="bf16", hidden_dtype="fp16")
