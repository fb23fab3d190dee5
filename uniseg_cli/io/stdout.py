"""Standard output, which carries only data (JSON lines, tables, paths): written so that a reader that
stops early (``| head``) or a full disk ends the command with one clear line instead of a traceback, a
silent exit or a table cut to 80 columns."""

from __future__ import annotations

import errno
import sys
from typing import Any

from uniseg_cli.errors import UnisegError


class StdoutClosed(BaseException):
    """Standard output's reader went away (EPIPE). A BaseException so that neither a per-case handler
    nor click (which turns EPIPE into a silent exit 1) takes it for something else; ``main`` reports it."""


def print_data(text: str) -> None:
    """One piece of data on standard output, flushed at once (a pipeline sees each case as it finishes)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        raise StdoutClosed() from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG):
            raise UnisegError(f"cannot write standard output ({exc.strerror})") from None
        raise


def data_console() -> Any:
    """A rich console for tables on standard output: the terminal's width on a terminal, and never cut
    to rich's default 80 columns when piped (``| less -S``, ``> file``)."""
    from rich.console import Console

    return Console(soft_wrap=False, width=None if sys.stdout.isatty() else 1000)
