"""Errors of the student trainer."""

import re

from formats.errors import KdError


class TrainError(KdError):
    """Bad training settings or a cache/student that do not fit together; the message names the setting or file."""


class LoaderError(KdError):
    """A resume state or setting that does not fit this cache, or a reader process that died."""


class AlignError(KdError):
    """A cache, teacher tokenizer or student tokenizer that cross-tokenizer training cannot use (xtok_align.py)."""


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says at which step, and which checkpoint --resume continues from."""


def write_failure(e: Exception) -> str:
    """Why a write failed, in a few words: an OSError's strerror ("No space left on device"), or the I/O error inside
    a safetensors SafetensorError ("Error while serializing: I/O error: File too large (os error 27)")."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    found = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", text)
    return found.group(1) if found else text
