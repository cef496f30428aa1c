"""Fixtures every test package shares: the real default teacher (converted once per machine) and a tiny random
teacher with its tokenizer. No test may reach the network."""

from __future__ import annotations

import logging
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from cache_builder.default_teacher import default_teacher_dir  # noqa: E402
from tests.cache_builder.tiny_teacher import make_tiny_teacher  # noqa: E402


@pytest.fixture(scope="session")
def teacher_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF folder in the user cache (the first run converts it, ~1 minute)."""
    return default_teacher_dir()


@pytest.fixture(scope="session")
def tokenizer_dir(teacher_dir: Path) -> Path:
    """The default teacher's folder, for its SmolLM2 tokenizer."""
    return teacher_dir


@pytest.fixture(scope="session")
def tokenizer(teacher_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(teacher_dir)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, teacher_dir: Path) -> Path:
    """2 layers, hidden 128, SmolLM2 tokenizer, 64 padded output rows past the vocabulary."""
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny") / "teacher", teacher_dir)


@pytest.fixture(scope="session")
def moto_endpoint() -> str:
    """moto's standalone S3 server on 127.0.0.1 (a free port), one for the session, stopped at its end."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
