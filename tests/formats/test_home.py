"""Where kdcache keeps its per-user files (formats/home.py): the builder's default teacher and the trainer's
cross-tokenizer vocabulary maps both go there."""

from __future__ import annotations

from pathlib import Path

from formats.home import kdcache_home


def test_kdcache_home_follows_kdcache_home_then_xdg_cache_home(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("KDCACHE_HOME", str(tmp_path / "k"))
    assert kdcache_home() == tmp_path / "k"
    monkeypatch.delenv("KDCACHE_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert kdcache_home() == tmp_path / "x" / "kdcache"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert kdcache_home() == Path.home() / ".cache" / "kdcache"
