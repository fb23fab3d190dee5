"""Progress bars on stderr (rich), shown only on a terminal: cases pre-processed, batches trained, bytes
downloaded, network passes of a case. One construction for all of them, so they look and behave alike."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any


def stderr_progress(unit: str) -> Any:
    """A transient rich ``Progress`` on stderr whose counter reads ``unit``: ``items`` (done/total),
    ``passes`` (done/total passes) or ``bytes`` (size and speed); with elapsed and remaining time."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    counter = {"items": [MofNCompleteColumn()], "passes": [MofNCompleteColumn(), TextColumn("passes")],
               "bytes": [DownloadColumn(), TransferSpeedColumn()]}[unit]
    return Progress(TextColumn("{task.description}"), BarColumn(), *counter, TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=True)


def on_terminal(enabled: bool) -> bool:
    """Bars are drawn only when asked for and stderr is a terminal (in pipelines and logs: log lines)."""
    return enabled and sys.stderr.isatty()


@contextlib.contextmanager
def counting_bar(description: str, total: int, *, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; draws nothing when disabled or when stderr is not a terminal."""
    if not on_terminal(enabled):
        yield lambda n=1: None
        return
    with stderr_progress("items") as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


@contextlib.contextmanager
def byte_bar(description: str, *, enabled: bool = True) -> Iterator[Callable[[int, int | None], None]]:
    """Yield ``report(done, total)`` for a download; draws only on a terminal, like ``counting_bar``."""
    if not on_terminal(enabled):
        yield lambda done, total: None
        return
    with stderr_progress("bytes") as progress:
        task = progress.add_task(description, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)
