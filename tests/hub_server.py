"""A minimal Hugging Face Hub on 127.0.0.1: the file-resolve endpoints hf_hub_download uses.

``HEAD``/``GET /{owner}/{name}/resolve/{revision}/{filename}`` answer with the headers the client
reads (``X-Repo-Commit``, ``ETag``, ``Content-Length``) or a 404 carrying the Hub's ``X-Error-Code``
(``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``). Revisions are branch names or commit
hashes. Every request is recorded so tests can tell cache hits from downloads.
"""

from __future__ import annotations

import hashlib
from http.server import BaseHTTPRequestHandler
from urllib.parse import unquote

from loopback import LoopbackServer


class FakeHub(LoopbackServer):
    def __init__(self) -> None:
        super().__init__()
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []

    def add_commit(self, repo: str, files: dict[str, bytes], *, branch: str = "main") -> str:
        """Add a commit holding ``files`` and move ``branch`` to it; returns the 40-hex commit."""
        entry = self.repos.setdefault(repo, {"commits": {}, "refs": {}})
        commit = hashlib.sha1(repr((repo, len(entry["commits"]), sorted(files))).encode()).hexdigest()
        entry["commits"][commit] = dict(files)
        entry["refs"][branch] = commit
        return commit

    def answer(self, request: BaseHTTPRequestHandler, *, body: bool) -> None:
        self.requests.append((request.command, request.path))
        parts = unquote(request.path.split("?")[0]).strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return _error(request, 404, "RepoNotFound")
        repo, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        entry = self.repos.get(repo)
        if entry is None:
            return _error(request, 404, "RepoNotFound")
        commit = entry["refs"].get(revision, revision)
        if commit not in entry["commits"]:
            return _error(request, 404, "RevisionNotFound")
        content = entry["commits"][commit].get(filename)
        if content is None:
            return _error(request, 404, "EntryNotFound")
        request.send_response(200)
        request.send_header("X-Repo-Commit", commit)
        request.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
        request.send_header("Content-Length", str(len(content)))
        request.send_header("Content-Type", "application/octet-stream")
        request.end_headers()
        if body:
            request.wfile.write(content)


def _error(request: BaseHTTPRequestHandler, status: int, code: str) -> None:
    request.send_response(status)
    request.send_header("X-Error-Code", code)
    request.send_header("X-Error-Message", code)
    request.send_header("Content-Length", "0")
    request.end_headers()
