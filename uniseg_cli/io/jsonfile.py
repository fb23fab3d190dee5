"""Reading the JSON files uniseg keeps (configs, plans, dataset descriptions, splits) with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from uniseg_cli.errors import UnisegError


def read_json(path: str | Path, error: type[UnisegError], *, missing: str = "no such file") -> Any:
    """The parsed file; a missing file reads ``PATH: <missing>``, a broken one names the parser's complaint."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: not a readable JSON file ({exc})") from None
