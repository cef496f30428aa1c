"""Portable hand-offs: what kdcache writes for other people (student folders, checkpoints, the converted default
teacher, caches) is readable by them (0644 / 0755 under the usual umask, and the umask honoured), and a cache that
travelled finds its teacher by fingerprint instead of the builder's absolute path."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from formats.atomic import atomic_write_bytes, share_tree
from formats.errors import CacheError
from formats.teacher_identity import SEARCH_ENV, find_teacher, fingerprint_weights
from student_trainer.checkpoint import save_checkpoint
from student_trainer.student import save_student


def _modes(folder: Path) -> set[tuple[str, int]]:
    out = {("dir", stat.S_IMODE(folder.stat().st_mode))}
    for p in folder.rglob("*"):
        out.add(("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)))
    return out


@pytest.fixture
def umask():
    old = os.umask(0o022)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(old)


def test_student_folders_and_checkpoints_are_readable_by_others_and_honour_the_umask(tiny_teacher, tmp_path, umask):
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    save_student(tmp_path / "final", model, tokenizer, {"student": "tiny"})
    assert _modes(tmp_path / "final") == {("dir", 0o755), ("file", 0o644)}
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt = save_checkpoint(tmp_path / "run", 1, model, optimizer, {})
    assert _modes(ckpt) == {("dir", 0o755), ("file", 0o644)}
    umask(0o077)
    save_student(tmp_path / "private", model, tokenizer, {"student": "tiny"})
    assert _modes(tmp_path / "private") == {("dir", 0o700), ("file", 0o600)}
    atomic_write_bytes(tmp_path / "m.json", b"{}")
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o600


def test_share_tree_opens_what_mkdtemp_and_safetensors_made_private(tmp_path, umask):
    folder = tmp_path / "teacher"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x")
    for p in (folder, folder / "sub"):
        p.chmod(0o700)
    (folder / "model.safetensors").chmod(0o600)
    share_tree(folder)
    assert _modes(folder) == {("dir", 0o755), ("file", 0o644)}


def test_a_cache_that_travelled_finds_its_teacher_by_fingerprint(tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("KDCACHE_HOME", str(tmp_path / "home"))
    info = {"name": "tiny", "path": "/nonexistent/builder/machine/tiny", "fingerprint": fingerprint_weights(tiny_teacher)}
    with pytest.raises(CacheError, match=rf"is not at '/nonexistent/builder/machine/tiny' nor in .*home/teachers.*{SEARCH_ENV}"):
        find_teacher(info)
    shelf = tmp_path / "shelf"
    shutil.copytree(tiny_teacher, shelf / "some-other-name")
    monkeypatch.setenv(SEARCH_ENV, str(shelf))
    assert find_teacher(info) == shelf / "some-other-name"
    (shelf / "some-other-name" / "config.json").write_text((tiny_teacher / "config.json").read_text() + " ")
    with pytest.raises(CacheError, match="is not at"):  # another teacher in that folder now: not taken
        find_teacher(info)
    home_copy = tmp_path / "home" / "teachers" / "tiny"
    shutil.copytree(tiny_teacher, home_copy)
    assert find_teacher(info) == home_copy  # the kdcache home's teachers/ is searched too
