"""Where a cache lives: a local folder or an fsspec URL (s3://, gs://, az://, http(s)://, ...), and the storage
options that reach it (SPEC.md, "Remote caches"; README, "Caches in object stores and over HTTP").

Storage options come from `--storage-option key=value` (the CLI puts them in $KDCACHE_STORAGE_OPTIONS as JSON, so
loader workers and other child processes see them too) and from fsspec's own environment route
(FSSPEC_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), which fsspec and the store's client library read themselves.
"""

from __future__ import annotations

import json
import os
import re
import socket
import uuid
from dataclasses import dataclass

from formats.atomic import atomic_write_bytes
from formats.errors import CacheError

OPTIONS_ENV = "KDCACHE_STORAGE_OPTIONS"
# A URL whose "//" a path library collapsed ("s3:/bucket/c"): writing it locally would make a folder named "s3:".
_MANGLED_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/(?!/)")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
READ_ONLY_PROTOCOLS = ("http", "https")


def parse_storage_option(text: str) -> tuple[str, object]:
    """'endpoint_url=http://127.0.0.1:9000' -> ('endpoint_url', 'http://...'); 'anon=true' -> ('anon', True);
    numbers become numbers; 'client_kwargs.region_name=eu-west-1' nests (see `storage_options`)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise CacheError(f"--storage-option {text!r}: expected key=value, e.g. endpoint_url=http://127.0.0.1:9000")
    low = value.strip().lower()
    parsed: object = value
    if low in ("true", "false"):
        parsed = low == "true"
    elif re.fullmatch(r"-?\d+", value.strip()):
        parsed = int(value)
    elif re.fullmatch(r"-?\d+\.\d*", value.strip()):
        parsed = float(value)
    return key.strip(), parsed


def options_from_flags(items: list[str]) -> dict:
    """Repeated `--storage-option key=value` as fsspec keyword arguments; `a.b=v` becomes {'a': {'b': v}}."""
    out: dict = {}
    for text in items:
        key, value = parse_storage_option(text)
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise CacheError(f"--storage-option {text!r}: {p} is given both as a value and as a group")
        node[leaf] = value
    return out


def set_storage_options(options: dict) -> None:
    """Make `options` the storage options of this process and its children (the CLI calls this)."""
    if options:
        os.environ[OPTIONS_ENV] = json.dumps(options)
    else:
        os.environ.pop(OPTIONS_ENV, None)


def storage_options() -> dict:
    """The storage options of this process: $KDCACHE_STORAGE_OPTIONS (JSON), read at each call."""
    text = os.environ.get(OPTIONS_ENV, "")
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CacheError(f"${OPTIONS_ENV}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CacheError(f"${OPTIONS_ENV}: expected a JSON object of fsspec storage options")
    return value


def storage_environment() -> dict[str, str]:
    """The variables that carry this process's storage settings to processes that do not inherit its environment
    (the replicas of a Ray build on a cluster started elsewhere): $KDCACHE_STORAGE_OPTIONS and fsspec's own
    FSSPEC_* configuration. Credentials in the store client's own variables (AWS_*, GOOGLE_*) are not among them:
    each node reaches the store with its own."""
    return {k: v for k, v in os.environ.items() if k == OPTIONS_ENV or k.startswith("FSSPEC_")}


def protocol_of(url: str) -> str:
    """'s3' for s3://b/c, 'file' for a local path."""
    m = _SCHEME.match(url)
    return m.group(1).lower() if m and not url.startswith("file://") else "file"


@dataclass
class Store:
    """A cache's root: `fs` (an fsspec filesystem) and `root`, the cache's path inside it."""

    url: str
    fs: object
    root: str
    local: bool

    @property
    def protocol(self) -> str:
        return protocol_of(self.url)

    def path(self, rel: str = "") -> str:
        if not rel:
            return self.root
        return os.path.join(self.root, rel) if self.local else f"{self.root.rstrip('/')}/{rel}"

    def name(self, rel: str = "") -> str:
        """`rel` as the user would write it (the URL form), for messages."""
        return f"{self.url.rstrip('/')}/{rel}" if rel else self.url

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))  # one plain GET: no Range request needed

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Local: temp + fsync + rename. Object store: one PUT, which the store makes visible whole or not at all."""
        if self.local:
            atomic_write_bytes(self.path(rel), data)
        else:
            self.fs.pipe_file(self.path(rel), data)

    def remove(self, rel: str) -> None:
        path = self.path(rel)
        if self.fs.isdir(path):
            self.fs.rm(path, recursive=True)
        elif self.fs.exists(path):
            self.fs.rm_file(path)

    def files(self, rel: str = "") -> list[str]:
        """Every file under `rel`, as paths relative to the cache root, sorted."""
        base = self.path(rel)
        if not self.fs.exists(base):
            return []
        prefix = self.root.rstrip("/") + "/"
        found = self.fs.find(base)
        return sorted(p[len(prefix):] if p.startswith(prefix) else p for p in found)


def open_store(url: str | os.PathLike, writing: bool = False) -> Store:
    """The store holding `url`, with this process's storage options. Refuses, in one line: a path that is a URL
    with its '//' lost (it would become a local folder named after the URL), an unknown scheme, a scheme whose
    package is not installed, and (`writing`) a read-only scheme."""
    import fsspec

    url = os.fspath(url)
    if _MANGLED_URL.match(url) and not os.path.exists(url):
        raise CacheError(f"{url}: looks like a URL that lost a '/' after its scheme (write {url.replace(':/', '://', 1)}); "
                         "kdcache never makes a local folder named after a URL")
    proto = protocol_of(url)
    if writing and proto in READ_ONLY_PROTOCOLS:
        raise CacheError(f"{url}: {proto}:// is read-only; write the cache locally or to an object store "
                         "(s3://, gs://, az://) and publish it there")
    if proto == "file":
        path = url[len("file://"):] if url.startswith("file://") else url
        return Store(url=url, fs=fsspec.filesystem("file"), root=os.path.abspath(path), local=True)
    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options())
    except ImportError as e:
        extra = _EXTRAS.get(proto)
        hint = f"pip install 'kdcache[{extra}]'" if extra else f"install the fsspec package for {proto}://"
        raise CacheError(f"{url}: reading {proto}:// needs a package that is not installed ({hint}; {e})") from None
    except (ValueError, TypeError) as e:
        raise CacheError(f"{url}: cannot open this URL ({e})") from None
    return Store(url=url, fs=fs, root=root.rstrip("/"), local=False)


def check_writable(url: str | os.PathLike) -> Store:
    """Refuse, in one line, an output a cache cannot be written to, before any expensive work: a read-only or
    unknown scheme, a missing bucket, missing credentials, a folder without write permission. Writes and removes
    one probe file (object stores: a probe object under the cache prefix)."""
    store = open_store(url, writing=True)
    probe = f".kdcache-probe-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        if store.local:
            os.makedirs(store.root, exist_ok=True)
        store.write_bytes(probe, b"")
        store.fs.rm_file(store.path(probe))
    except CacheError:
        raise
    except Exception as e:  # the store's client raises its own types (botocore, aiohttp, gcsfs...)
        raise CacheError(f"{store.url}: cannot write a cache here ({_reason(e)})") from None
    return store


def _reason(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return text.splitlines()[0][:300]


def describe_error(e: BaseException) -> str:
    """One line for an error raised by a store's client library."""
    return f"{type(e).__name__}: {_reason(e)}"
