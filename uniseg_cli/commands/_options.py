"""Option parsing shared by several commands."""

from __future__ import annotations

from typing import Callable, TypeVar

from uniseg_cli.errors import UsageError

N = TypeVar("N", int, float)


def parse_triple(text: str | None, option: str, kind: Callable[[str], N], what: str) -> tuple[N, N, N] | None:
    """``"Z,Y,X"`` as three positive numbers, or None when the option was not given."""
    if text is None:
        return None
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) <= 0:
        raise UsageError(f"{option} must be three positive {what} Z,Y,X, got {text!r}")
    return values  # type: ignore[return-value]
