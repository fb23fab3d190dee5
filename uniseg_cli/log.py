"""Logging to standard error, so that standard output carries only data (paths, tables, JSON)."""

from __future__ import annotations

import logging


def setup_logging(verbosity: int) -> None:
    """-1 quiet (warnings and errors), 0 normal (info), 1 verbose (debug)."""
    from rich.console import Console
    from rich.logging import RichHandler

    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False,
                          show_level=verbosity > 0, markup=False, rich_tracebacks=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("uniseg_cli").setLevel(level)
