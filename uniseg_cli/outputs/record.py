"""The case record: ``<name>.json`` beside a case's first label map, written last.

It is the label table of that map (the sidecar format of ``uniseg_cli.outputs.sidecar``) plus what
the case published: every other file of the case with its size and SHA-256, and the ``--json`` record
(volumes, statistics). Because it is published after every other file of the case, and says exactly
what those files were, it is what ``--skip-existing`` trusts: a case is done only when its record
reads back and every planned file is there with the recorded size and hash (a 0-byte, truncated or
replaced map is not). The ``--statistics-csv`` table is rebuilt from the records, so resumed and
sharded runs keep every row; and a later run recognises the files a record lists as outputs, not scans.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from uniseg_cli.outputs.sidecar import SIDECAR_FORMAT

RECORD_VERSION = 2
_HASH_CHUNK = 1 << 20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(role: str, final: Path, written: Path, record: Path) -> tuple[str, dict[str, Any]]:
    """(name relative to the record's folder, {role, bytes, sha256}) of a file written to ``written``
    that will be published as ``final``."""
    return os.path.relpath(final, record.parent), {"role": role, "bytes": written.stat().st_size,
                                                   "sha256": sha256(written)}


def finite(value: Any) -> Any:
    """``value`` with every non-finite float turned into None: JSON has no NaN or Infinity (Python's
    ``json`` would write them, and other readers then refuse the whole line)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, **options: Any) -> str:
    """JSON text that is valid JSON: non-finite numbers become null (see ``finite``)."""
    return json.dumps(finite(value), allow_nan=False, **options)


def read_record(path: Path) -> dict[str, Any] | None:
    """The case record at ``path``, or None if it is absent, unreadable, or not a record of this version."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT or data.get("version") != RECORD_VERSION:
        return None
    if not isinstance(data.get("files"), dict):
        return None
    return data


def incomplete(record_path: Path, planned: Iterable[Path]) -> str | None:
    """Why the outputs ``planned`` (besides the record) are not a finished case, or None if they are."""
    record = read_record(record_path)
    if record is None:
        return f"no complete record {record_path.name}" if record_path.exists() else f"no record {record_path.name}"
    files = record["files"]
    for path in planned:
        name = os.path.relpath(path, record_path.parent)
        entry = files.get(name)
        if entry is None:
            return f"{record_path.name} does not list {name} (written with other options?)"
        try:
            size = path.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != entry.get("bytes"):
            return f"{name} has {size} bytes, {entry.get('bytes')} were written"
        if sha256(path) != entry.get("sha256"):
            return f"{name} changed since it was written"
    return None


def listed_outputs(folder: Path) -> dict[str, str]:
    """Names of the files in ``folder`` that a uniseg case record or label table there lists as its
    outputs → that record's name."""
    listed: dict[str, str] = {}
    try:
        candidates = sorted(p for p in folder.iterdir() if p.name.endswith(".json") and not p.name.startswith("."))
    except OSError:
        return listed
    for path in candidates:
        try:
            if path.stat().st_size > 16 << 20:
                continue
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
            continue
        names = [data.get("label_map")] + list((data.get("files") or {}).keys())
        for name in names:
            if isinstance(name, str) and "/" not in name and os.sep not in name:
                listed.setdefault(name, path.name)
    return listed
