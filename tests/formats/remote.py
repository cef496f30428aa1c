"""Helpers of the remote-store tests: the loopback S3 bucket's handle and two HTTP handlers (with and without Range
support). The servers themselves are fixtures in conftest.py."""

from __future__ import annotations

import http.server
import os
import re
from dataclasses import dataclass


def s3_options(endpoint: str) -> dict:
    """Storage options that reach moto's server: its endpoint and any credentials (moto accepts all)."""
    return {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}


@dataclass
class S3:
    url: str  # s3://<bucket>
    fs: object  # an s3fs filesystem on the bucket's server
    options: dict


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """`python -m http.server`'s handler: ignores Range headers (every GET is the whole file, status 200)."""

    def log_message(self, *args) -> None:
        pass


class RangeHandler(QuietHandler):
    """Answers `Range: bytes=a-b` with 206 and just those bytes, as object stores and CDNs do."""

    def send_head(self):
        self._remaining = None
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        path = self.translate_path(self.path)
        if not match or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        first = int(match.group(1)) if match.group(1) else max(0, size - int(match.group(2)))
        last = min(int(match.group(2)), size - 1) if match.group(1) and match.group(2) else size - 1
        if first >= size:
            self.send_error(416)
            return None
        f = open(path, "rb")
        f.seek(first)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._remaining = last - first + 1
        return f

    def copyfile(self, source, outputfile) -> None:
        remaining = getattr(self, "_remaining", None)
        if remaining is None:
            return super().copyfile(source, outputfile)
        outputfile.write(source.read(remaining))
