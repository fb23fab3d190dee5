"""A minimal Hugging Face Hub on 127.0.0.1: the file-resolve endpoints hf_hub_download uses.

``HEAD``/``GET /{owner}/{name}/resolve/{revision}/{filename}`` answer with the headers the client
reads (``X-Repo-Commit``, ``ETag``, ``Content-Length``) or a 404 carrying the Hub's ``X-Error-Code``
(``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``). Revisions are branch names or commit
hashes. Every request is recorded so tests can tell cache hits from downloads.
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self._server: ThreadingHTTPServer | None = None

    def add_commit(self, repo: str, files: dict[str, bytes], *, branch: str = "main") -> str:
        """Add a commit holding ``files`` and move ``branch`` to it; returns the 40-hex commit."""
        entry = self.repos.setdefault(repo, {"commits": {}, "refs": {}})
        commit = hashlib.sha1(repr((repo, len(entry["commits"]), sorted(files))).encode()).hexdigest()
        entry["commits"][commit] = dict(files)
        entry["refs"][branch] = commit
        return commit

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, *, body: bool) -> None:
                hub.requests.append((self.command, self.path))
                parts = unquote(self.path.split("?")[0]).strip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, "RepoNotFound")
                repo, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                entry = hub.repos.get(repo)
                if entry is None:
                    return self._error(404, "RepoNotFound")
                commit = entry["refs"].get(revision, revision)
                if commit not in entry["commits"]:
                    return self._error(404, "RevisionNotFound")
                content = entry["commits"][commit].get(filename)
                if content is None:
                    return self._error(404, "EntryNotFound")
                self.send_response(200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
                self.send_header("Content-Length", str(len(content)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if body:
                    self.wfile.write(content)

            def _error(self, status: int, code: str) -> None:
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
