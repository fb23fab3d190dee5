"""The user's model store and settings: installed models, the default model, accepted licences.

Models a user installs (``uniseg weights download`` of a release, ``uniseg weights import --name``)
live in one folder per name under ``<home>/models``; their downloads are resumed from
``<home>/downloads``. ``<home>`` is ``$UNISEG_HOME`` if set, else ``$XDG_CACHE_HOME/uniseg``, else
``~/.cache/uniseg``.

The settings (which model is the default, which licences were accepted) are a small JSON file that a
wiped cache must not take with it: ``$UNISEG_HOME/settings.json`` if ``UNISEG_HOME`` is set (one
variable then moves everything, as tests and shared installations need), else
``$XDG_CONFIG_HOME/uniseg/settings.json``, else ``~/.config/uniseg/settings.json``.

Torch-free: listing models and resolving names must not import it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from uniseg_cli.errors import UnisegError, UsageError
from uniseg_cli.io.atomic import make_folder, write_text
from uniseg_cli.io.jsonfile import read_json

MANIFEST_NAME = "manifest.json"
MODEL_ENV = "UNISEG_MODEL"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SettingsError(UnisegError):
    """The settings file exists but cannot be read or written."""


def home() -> Path:
    """Where installed models and their downloads live."""
    if os.environ.get("UNISEG_HOME"):
        return Path(os.environ["UNISEG_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "uniseg"


def settings_path() -> Path:
    if os.environ.get("UNISEG_HOME"):
        return home() / "settings.json"
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config).expanduser() / "uniseg" / "settings.json"


def check_name(name: str) -> str:
    """A store name is one path component (letters, digits, ``._-``), so it can never be a Hub name."""
    if not _NAME.match(name):
        raise UsageError(f"model name {name!r}: use letters, digits, '.', '_' and '-' (no '/'), starting with a "
                         "letter or digit")
    return name


def model_folder(name: str) -> Path:
    return home() / "models" / check_name(name)


def download_folder(name: str) -> Path:
    return home() / "downloads" / check_name(name)


def installed_folder(name: str) -> Path | None:
    """The store folder of ``name`` if a complete model is installed there."""
    if not _NAME.match(name):
        return None
    folder = home() / "models" / name
    return folder if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() else None


def installed_names() -> list[str]:
    """Names of the installed models (temporary ``.partial`` folders of unfinished installs excluded)."""
    root = home() / "models"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and installed_folder(p.name))


def read_manifest(folder: Path) -> dict[str, Any]:
    """What an install recorded (origin, sha256 of downloaded and converted files); empty if none."""
    path = folder / MANIFEST_NAME
    return read_json(path, UnisegError) if path.is_file() else {}


def now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


# ------------------------------------------------------------------------------------------ settings
def read_settings() -> dict[str, Any]:
    path = settings_path()
    if not path.is_file():
        return {}
    data = read_json(path, SettingsError)
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: not a uniseg settings file (expected a JSON object)")
    return data


def _write_settings(data: dict[str, Any]) -> None:
    path = settings_path()
    make_folder(path.parent)
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class DefaultModel:
    """The model used when a command gets no ``--model``, and what chose it (for messages)."""

    spec: str
    origin: str


def default_model() -> DefaultModel | None:
    """``$UNISEG_MODEL``, else the default in the settings, else None."""
    if os.environ.get(MODEL_ENV):
        return DefaultModel(os.environ[MODEL_ENV], f"${MODEL_ENV}")
    spec = read_settings().get("default_model")
    if isinstance(spec, str) and spec:
        return DefaultModel(spec, f"`uniseg weights default`, {settings_path()}")
    return None


def set_default_model(spec: str | None) -> None:
    """Record ``spec`` as the default model (None forgets it)."""
    data = read_settings()
    if spec is None:
        data.pop("default_model", None)
    else:
        data["default_model"] = spec
    _write_settings(data)


def set_default_if_unset(spec: str) -> bool:
    """Make ``spec`` the default when the settings name none (the first install); True if it did."""
    if read_settings().get("default_model"):
        return False
    set_default_model(spec)
    return True


def license_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def license_acceptance(name: str, text: str) -> str | None:
    """When the user accepted this exact licence text for model ``name`` (ISO time), or None."""
    record = read_settings().get("accepted_licenses", {}).get(name)
    if isinstance(record, dict) and record.get("sha256") == license_digest(text):
        return str(record.get("accepted_at", ""))
    return None


def accept_license(name: str, text: str) -> str:
    """Record that the user accepted ``text`` for ``name``; a changed text must be accepted again."""
    data = read_settings()
    when = now()
    data.setdefault("accepted_licenses", {})[name] = {"sha256": license_digest(text), "accepted_at": when}
    _write_settings(data)
    return when
