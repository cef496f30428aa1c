"""Errors of the student trainer."""

from formats.errors import KdError


class TrainError(KdError):
    """Bad training settings or a cache/student that do not fit together; the message names the setting or file."""


class LoaderError(KdError):
    """A resume state or setting that does not fit this cache, or a reader process that died."""


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says at which step, and which checkpoint --resume continues from."""
