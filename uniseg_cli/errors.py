"""Errors a user can cause, each turned into one ``Error: …`` line and an exit code by the CLI.

Library code raises these instead of printing, so that the same failure reads the same from the
command line and from Python.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UnisegError(Exception):
    """Base of every error uniseg reports to a user; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(UnisegError):
    """The request itself is wrong (unknown name, bad option value): exit code 2, like a CLI typo."""

    exit_code = 2


class UnknownNameError(UsageError):
    """A task, device or model name that is not known; carries the valid names for "did you mean"."""

    def __init__(self, kind: str, name: str, valid: Iterable[str], *, kinds: str = "") -> None:
        self.kind = kind
        self.name = name
        self.valid = sorted(set(valid))
        hint = did_you_mean(name, self.valid)
        message = f"unknown {kind} {name!r}" + (f" ({kinds})" if kinds else "")
        if hint:
            message += f"; did you mean {hint!r}?"
        elif self.valid:
            message += f"; valid: {', '.join(self.valid)}"
        super().__init__(message)


class DeviceError(UsageError):
    """The asked-for device does not exist on this machine or in this torch build."""


class ConfigError(UnisegError):
    """A model configuration (``config.json``) that is malformed or inconsistent."""


class ModelFileError(UnisegError):
    """A model folder or weight file that is missing, unreadable, or does not match its config."""


class CheckpointError(UnisegError):
    """A legacy checkpoint or plans file that cannot be converted (or was refused as unsafe)."""


class InputShapeError(UnisegError):
    """A tensor handed to the network that it cannot take (channel count, patch size, task)."""


class ImplausibleInputError(UnisegError):
    """A scan that is not the kind of image its task expects (uniseg_cli.quality.plausibility)."""


def first_line(message: object) -> str:
    """The first line of an exception's (or any) message, for one-line errors; the type name if empty."""
    text = str(message).strip()
    return text.splitlines()[0] if text else type(message).__name__


def did_you_mean(name: str, valid: Iterable[str]) -> str | None:
    """The closest valid spelling of ``name``, or None when nothing is close."""
    matches = difflib.get_close_matches(name.lower(), [v.lower() for v in valid], n=1, cutoff=0.6)
    if not matches:
        return None
    lowered = {v.lower(): v for v in valid}
    return lowered[matches[0]]
