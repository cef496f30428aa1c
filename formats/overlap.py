"""Outputs that overlap their inputs are refused before any work: a command never reads what it writes, and never
deletes (`--overwrite`) or writes into what it reads.

Paths are compared after resolving symlinks, either way round: an output inside an input (a cache built into its
own corpus folder would read its shards as corpus the next time), an input inside an output (`--overwrite` would
delete it), or the same folder under two names (`ln -s c a; kdcache convert c --out a`). URLs (`s3://...`) are
compared as written.
"""

from __future__ import annotations

import os
from pathlib import Path

from formats.errors import CacheError

GLOB_CHARS = "*?["


def _real(path: str) -> str:
    """`path` with symlinks resolved (as far as it exists), or a URL as written. A glob stands for the folder it
    starts in."""
    if "://" in path:
        return path.rstrip("/")
    if any(c in path for c in GLOB_CHARS):
        parts = Path(path).parts
        path = str(Path(*parts[:next(i for i, p in enumerate(parts) if any(c in p for c in GLOB_CHARS))]) or ".")
    return os.path.realpath(os.path.expanduser(path))  # a symlink loop is left as it is; the input's own check names it


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def check_no_overlap(out_flag: str, out: str, inputs: dict[str, list[str]],
                     error: type[Exception] = CacheError) -> None:
    """Raise `error` (one line naming both flags) if output `out` (given as `out_flag`) and any input overlap.
    `inputs` maps a flag (e.g. '--corpus') to the paths given for it; an empty path (a flag not given) is skipped."""
    o = _real(str(out))
    for flag, paths in inputs.items():
        for raw in filter(None, paths):
            i = _real(str(raw))
            if o == i:
                link = "://" not in o and os.path.abspath(os.path.expanduser(str(out))) != \
                    os.path.abspath(os.path.expanduser(str(raw)))
                raise error(f"{out_flag} {out} is {flag} {raw}{' (through a symlink)' if link else ''}: "
                            f"a command never writes over what it reads; choose another {out_flag}")
            if _inside(o, i):
                raise error(f"{out_flag} {out} lies inside {flag} {raw}: the output would be read as input; choose an "
                            f"{out_flag} outside it")
            if _inside(i, o):
                raise error(f"{flag} {raw} lies inside {out_flag} {out}: writing (or --overwrite) there would destroy "
                            f"the input; choose an {out_flag} outside it")
