"""Where kdcache keeps its per-user files (the converted default teacher, cross-tokenizer vocabulary maps):
$KDCACHE_HOME, else $XDG_CACHE_HOME/kdcache, else ~/.cache/kdcache. The builder and the trainer both use it,
so it lives here, in the package both may import."""

from __future__ import annotations

import os
from pathlib import Path


def kdcache_home() -> Path:
    """$KDCACHE_HOME, else $XDG_CACHE_HOME/kdcache, else ~/.cache/kdcache (read at each call)."""
    if os.environ.get("KDCACHE_HOME"):
        return Path(os.environ["KDCACHE_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kdcache"
