"""Errors of the cache builder."""

from formats.errors import KdError


class BuildError(KdError):
    """Bad build input or a build that cannot proceed; the message names the file, line or field."""
