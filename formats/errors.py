"""The one error type users see.

Every package raises a subclass of `KdError` for bad input or a bad cache; the `kdcache` command turns
it into one line on stderr and exit status 2. Anything else is a bug and keeps its traceback.
"""


class KdError(Exception):
    """A user-facing error: the message names the file, shard, line or field at fault."""


class CacheError(KdError):
    """A cache (manifest or shard) is malformed, unsafe, or not what the caller asked for."""
