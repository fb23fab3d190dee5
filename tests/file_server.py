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
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FileServer:
    def __init__(self, files: dict[str, bytes], *, ranges: bool = True) -> None:
        self.files = dict(files)
        self.ranges = ranges
        self.cut_after: int | None = None
        self.requests: list[tuple[str, str, str | None]] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FileServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, *, body: bool) -> None:
                wanted = self.headers.get("Range")
                server.requests.append((self.command, self.path, wanted))
                content = server.files.get(self.path.lstrip("/"))
                if content is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
                if server.ranges and match and int(match.group(1)) < len(content):
                    start = int(match.group(1))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
                else:
                    self.send_response(200)
                if server.ranges:
                    self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
                self.send_header("Content-Length", str(len(content) - start))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if not body:
                    return
                payload = content[start:]
                if server.cut_after is not None:
                    self.wfile.write(payload[:server.cut_after])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
