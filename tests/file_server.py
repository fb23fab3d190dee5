"""A plain HTTP file server on 127.0.0.1, like the internal mirror a hospital keeps of published weights.

Serves ``GET``/``HEAD /<name>`` with ``Content-Length`` and an ``ETag``; answers ``Range: bytes=N-`` with
206 when ``ranges`` is on (as nginx and S3 do) and with the whole file when off (as Python's own
http.server does). ``cut_after`` makes every response stop after that many body bytes and drop the
connection: a network that fails mid-download. Every request is recorded with its Range header.
"""

from __future__ import annotations

import hashlib
import re
import socket
from http.server import BaseHTTPRequestHandler

from loopback import LoopbackServer


class FileServer(LoopbackServer):
    protocol_version = "HTTP/1.1"

    def __init__(self, files: dict[str, bytes], *, ranges: bool = True) -> None:
        super().__init__()
        self.files = dict(files)
        self.ranges = ranges
        self.cut_after: int | None = None
        self.requests: list[tuple[str, str, str | None]] = []

    def answer(self, request: BaseHTTPRequestHandler, *, body: bool) -> None:
        wanted = request.headers.get("Range")
        self.requests.append((request.command, request.path, wanted))
        content = self.files.get(request.path.lstrip("/"))
        if content is None:
            request.send_response(404)
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
        if self.ranges and match and int(match.group(1)) < len(content):
            start = int(match.group(1))
            request.send_response(206)
            request.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        else:
            request.send_response(200)
        if self.ranges:
            request.send_header("Accept-Ranges", "bytes")
        request.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
        request.send_header("Content-Length", str(len(content) - start))
        request.send_header("Content-Type", "application/octet-stream")
        request.end_headers()
        if not body:
            return
        payload = content[start:]
        if self.cut_after is not None:
            request.wfile.write(payload[:self.cut_after])
            request.wfile.flush()
            request.connection.shutdown(socket.SHUT_RDWR)
            request.close_connection = True
            return
        request.wfile.write(payload)
