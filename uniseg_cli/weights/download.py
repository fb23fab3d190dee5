"""Fetching one published file, resumably: from Google Drive by file id, or from a plain HTTP(S) URL.

Both go through gdown, so that the mirror the tests serve on 127.0.0.1 exercises the same code as
Google Drive: gdown passes Drive's confirmation page for large files, writes to a ``.part`` file
beside the destination and renames it when complete, and on a rerun resumes that file with a Range
request (guarded by If-Range, so a changed file is not spliced onto old bytes). A server that does not
honour ranges gets the file again from the start.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from uniseg_cli.errors import UnisegError, first_line
from uniseg_cli.progress import byte_bar

log = logging.getLogger(__name__)

RETRIES = 3  # per file, for dropped connections; each retry resumes where the last one stopped
TIMEOUT_S = (30.0, 120.0)  # connect, and between two received bytes


class DownloadFailed(UnisegError):
    """A download that did not complete; what was received is kept and a rerun resumes it."""


def fetch(dest: Path, *, url: str | None = None, gdrive_id: str | None = None, progress: bool = True) -> Path:
    """Download ``url`` (or the Drive file ``gdrive_id``) to ``dest``; a complete ``dest`` is kept as is."""
    import gdown
    import requests
    from gdown.exceptions import DownloadError

    if dest.is_file():
        return dest
    origin = url or f"Google Drive file {gdrive_id}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    kwargs = dict(output=str(dest), quiet=True, resume=True, retries=RETRIES, timeout=TIMEOUT_S,
                  use_cookies=gdrive_id is not None)
    if gdrive_id is not None:
        kwargs["id"] = gdrive_id
    else:
        kwargs["url"] = url
    log.info("downloading %s from %s", dest.name, origin)
    start = time.monotonic()
    with byte_bar(dest.name, enabled=progress) as report:
        for attempt in (1, 2):
            try:
                gdown.download(progress=report, **kwargs)
                break
            except DownloadError as exc:
                if attempt == 1 and "did not honor the requested byte range" in str(exc):
                    log.info("%s: the server cannot resume; downloading it again from the start", origin)
                    for partial in _partials(dest):
                        partial.unlink()
                    continue
                raise DownloadFailed(f"{dest.name}: download from {origin} stopped ({first_line(exc)}); "
                                     f"{_next_step(dest, gdrive_id)}") from None
            except requests.RequestException as exc:
                status = getattr(getattr(exc, "response", None), "status_code", None)
                if status is not None and 400 <= status < 500:
                    raise DownloadFailed(f"{dest.name}: {origin} answered HTTP {status} "
                                         f"{exc.response.reason}: the file is not there") from None
                raise DownloadFailed(f"{dest.name}: cannot download from {origin} ({_reason(exc)}); "
                                     f"{_next_step(dest, gdrive_id)}") from None
    if not dest.is_file():  # gdown returned without publishing the file (a Drive page it could not parse)
        raise DownloadFailed(f"{dest.name}: {origin} did not deliver the file")
    size = dest.stat().st_size
    log.info("%s: %.1f MiB in %.1f s", dest.name, size / 2**20, time.monotonic() - start)
    return dest


def _next_step(dest: Path, gdrive_id: str | None) -> str:
    hint = "run the same command again to resume it"
    if gdrive_id is not None:  # Drive also refuses popular large files for a while ("too many users")
        hint += (f"; if Google Drive keeps refusing, get {dest.name} in a browser from "
                 f"https://drive.google.com/uc?id={gdrive_id} and install it with `uniseg weights import`")
    return hint


def _partials(dest: Path) -> list[Path]:
    """gdown's unfinished files for ``dest``: its name, 8 random characters, ``.part``."""
    return [p for p in dest.parent.glob(f"{dest.name}*.part") if len(p.name) == len(dest.name) + 13]


def _reason(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if response is not None:
        return f"HTTP {response.status_code} {response.reason}"
    return first_line(exc)
