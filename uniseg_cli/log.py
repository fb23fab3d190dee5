"""Logging to standard error, so that standard output carries only data (paths, tables, JSON).

On a terminal, rich formats the messages; in pipelines and log files they are plain unwrapped
lines, one per message, so they stay grep-able.
"""

from __future__ import annotations

import logging
import sys


def setup_logging(verbosity: int) -> None:
    """-1 quiet (warnings and errors), 0 normal (info), 1 verbose (debug)."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False,
                              show_level=verbosity > 0, markup=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if verbosity > 0 else "%(message)s"))
    root = logging.getLogger("uniseg_cli")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
