"""An HTTP server on 127.0.0.1 (a free port, a daemon thread) for tests that must not touch the network.

Subclasses answer ``GET``/``HEAD`` in ``answer(request, body=...)``, writing to the standard library's
request handler; the local Hub (``hub_server.py``) and the weights mirror (``file_server.py``) share
the rest here.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackServer:
    protocol_version = "HTTP/1.0"

    def __init__(self) -> None:
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def answer(self, request: BaseHTTPRequestHandler, *, body: bool) -> None:
        """Send the status, headers and (when ``body``) the content for ``request.path``."""
        request.send_error(501)

    def start(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = owner.protocol_version

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                owner.answer(self, body=False)

            def do_GET(self) -> None:
                owner.answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
