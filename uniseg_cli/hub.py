"""Model specs to model folders: local folders, the registry, and the Hugging Face Hub.

One function, ``resolve_model``, turns what a user types after ``--model`` into a local folder with
``config.json`` and ``model.safetensors``:

1. ``hf://owner/name[@revision]``: always the Hub.
2. A path that exists (folder, or ``.safetensors`` beside its ``config.json``): that path, always;
   a Hub repo whose name is also a local path is written ``hf://owner/name``.
3. A registry name (``uniseg weights list``): its pinned Hub revision, verified against its sha256s,
   or its bundled folder.
4. ``owner/name[@revision]``: the Hub (revision ``main`` if none).

It also names the two files of a model folder (``model_paths``), torch-free so that listing a model's
tasks needs no torch. Downloads use huggingface_hub, so the standard cache and ``HF_HOME``, ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and ``HF_TOKEN`` apply.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from uniseg_cli.errors import ModelFileError, UnisegError, UnknownNameError, UsageError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME)


def model_paths(path: str | Path) -> tuple[Path, Path]:
    """``(config.json, model.safetensors)`` of a model folder, or of a ``.safetensors`` file's folder."""
    path = Path(path)
    if path.suffix == ".safetensors" and not path.is_dir():
        weights, config = path, path.parent / CONFIG_NAME
    else:
        weights, config = path / WEIGHTS_NAME, path / CONFIG_NAME
    if not path.exists():
        raise ModelFileError(f"{path}: no such model folder or file")
    for needed in (config, weights):
        if not needed.is_file():
            raise ModelFileError(f"{path}: not a model folder ({needed.name} is missing)")
    return config, weights


REGISTRY_VERSION = 1
log = logging.getLogger(__name__)
_HUB_NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class RegistryError(UnisegError):
    """The shipped registry is malformed (a packaging bug, caught by the tests)."""


@dataclass(frozen=True)
class RegistryEntry:
    """One named model: pinned Hub files, or a folder bundled inside the package."""

    name: str
    description: str
    tasks: tuple[str, ...]
    license: str
    files: dict[str, str] = field(default_factory=dict)
    repo: str | None = None
    revision: str | None = None
    path: str | None = None

    @property
    def source(self) -> str:
        return f"bundled:{self.path}" if self.path else f"{self.repo}@{self.revision}"


@dataclass(frozen=True)
class Registry:
    default: str | None
    models: dict[str, RegistryEntry]


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model spec led: the local folder, and the registry entry when there is one."""

    path: Path
    spec: str
    entry: RegistryEntry | None = None
    repo: str | None = None
    revision: str | None = None


def registry_folder() -> Path:
    return Path(str(resources.files("uniseg_cli.weights")))


def load_registry(path: Path | None = None) -> Registry:
    """Read and validate ``registry.json`` (the shipped one unless ``path`` is given)."""
    path = path or registry_folder() / "registry.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{path}: unreadable registry ({exc})") from None
    return parse_registry(data, source=str(path))


def parse_registry(data: Any, *, source: str = "registry") -> Registry:
    from uniseg_cli.tasks import UPSTREAM_TASKS

    if not isinstance(data, dict) or set(data) != {"format_version", "default", "models"}:
        raise RegistryError(f"{source}: expected keys format_version, default, models")
    if data["format_version"] != REGISTRY_VERSION:
        raise RegistryError(f"{source}: format_version {data['format_version']!r} is not {REGISTRY_VERSION}")
    known_tasks = {t.key for t in UPSTREAM_TASKS}
    models = {}
    for name, raw in data["models"].items():
        where = f"{source}: model {name!r}"
        allowed = {"description", "tasks", "license", "files", "repo", "revision", "path"}
        if not isinstance(raw, dict) or set(raw) - allowed:
            raise RegistryError(f"{where}: unknown keys {sorted(set(raw) - allowed) if isinstance(raw, dict) else raw}")
        entry = RegistryEntry(name=name, description=str(raw.get("description", "")),
                              tasks=tuple(raw.get("tasks", ())), license=str(raw.get("license", "")),
                              files=dict(raw.get("files", {})), repo=raw.get("repo"), revision=raw.get("revision"),
                              path=raw.get("path"))
        if (entry.repo is None) == (entry.path is None):
            raise RegistryError(f"{where}: give exactly one of repo (Hub) or path (bundled)")
        if entry.repo is not None and not (_HUB_NAME.match(entry.repo) and entry.revision and _COMMIT.match(entry.revision)):
            raise RegistryError(f"{where}: needs repo owner/name and revision pinned to a 40-hex commit")
        if set(entry.files) != set(MODEL_FILES) or not all(_SHA256.match(h) for h in entry.files.values()):
            raise RegistryError(f"{where}: files must pin the sha256 of {', '.join(MODEL_FILES)}")
        if not entry.tasks or set(entry.tasks) - known_tasks and not entry.path:
            raise RegistryError(f"{where}: tasks must be registry task keys, got {list(entry.tasks)}")
        if not entry.license:
            raise RegistryError(f"{where}: the licence of the weights is required")
        models[name] = entry
    default = data["default"]
    if default is not None and default not in models:
        raise RegistryError(f"{source}: default {default!r} is not one of the models")
    return Registry(default=default, models=models)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_model(spec: str | Path | None, *, registry: Registry | None = None) -> ResolvedModel:
    """The local model folder for ``spec`` (see the module docstring); ``None`` means the default model."""
    registry = registry or load_registry()
    if spec is None:
        if registry.default is None:
            raise UsageError("no --model given and no default model is registered yet; pass --model with a model "
                             "folder (see `uniseg weights import`) or a Hub name owner/name[@revision]")
        spec = registry.default
    text = str(spec)
    if text.startswith("hf://"):
        return _from_hub(text, text[len("hf://"):])
    local = Path(text).expanduser()
    if local.exists():
        if text in registry.models or _HUB_NAME.match(text):
            log.info("model %r: using the local path (write hf://%s for the Hub)", text, text)
        return ResolvedModel(path=local, spec=text)
    if text in registry.models:
        return _from_registry(registry.models[text])
    if _HUB_NAME.match(text):
        return _from_hub(text, text)
    raise UnknownNameError("model", text, list(registry.models),
                           kinds="no such folder or .safetensors file, registry name, or Hub owner/name[@revision]")


def _from_registry(entry: RegistryEntry) -> ResolvedModel:
    if entry.path is not None:
        folder = registry_folder() / entry.path
        verify_files(folder, entry)
        return ResolvedModel(path=folder, spec=entry.name, entry=entry)
    folder = download(entry.repo, entry.revision, name=entry.name, pins=entry.files)  # type: ignore[arg-type]
    return ResolvedModel(path=folder, spec=entry.name, entry=entry, repo=entry.repo, revision=entry.revision)


def _from_hub(spec: str, name: str) -> ResolvedModel:
    match = _HUB_NAME.match(name)
    if not match:
        raise UsageError(f"model {spec!r}: a Hub name is owner/name or owner/name@revision")
    repo, revision = match.group("repo"), match.group("revision") or "main"
    try:
        folder = download(repo, revision, name=spec)
    except ModelFileError as exc:
        if spec.startswith("hf://"):
            raise
        raise ModelFileError(f"{exc} (there is no local folder {spec!r} either)") from None
    return ResolvedModel(path=folder, spec=spec, repo=repo, revision=revision)


def download(repo: str, revision: str, *, name: str, pins: dict[str, str] | None = None) -> Path:
    """Fetch (or find in the cache) a model's two files at ``revision``; verify pinned hashes."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    where = f"{repo}@{revision}"
    label = f"{name!r}" + ("" if name.removeprefix("hf://") == where else f" ({where})")
    paths = []
    for filename in MODEL_FILES:
        try:
            paths.append(Path(hf_hub_download(repo, filename, revision=revision)))
        except LocalEntryNotFoundError:
            raise ModelFileError(
                f"model {label} is not in the local cache and the Hub cannot be reached (offline); get it "
                f"with `uniseg weights download {name}` on a connected machine, or convert the original checkpoint "
                "with `uniseg weights import`") from None
        except GatedRepoError:
            raise ModelFileError(f"model {name!r}: {repo} is gated; accept its terms on the Hub and set HF_TOKEN") from None
        except RepositoryNotFoundError:
            raise ModelFileError(f"model {name!r}: Hub repository {repo} not found (or private: set HF_TOKEN)") from None
        except RevisionNotFoundError:
            raise ModelFileError(f"model {name!r}: revision {revision!r} not found in {repo}") from None
        except EntryNotFoundError:
            raise ModelFileError(f"model {name!r}: {where} has no {filename}; not a uniseg model folder") from None
    folder = paths[0].parent
    if pins:
        for path in paths:
            _check_hash(path, pins[path.name], name=name, remove=True)
    return folder


def verify_files(folder: Path, entry: RegistryEntry) -> dict[str, str]:
    """Re-hash a model's files against its registry pins; a mismatch is an error naming the file."""
    hashes = {}
    for filename in MODEL_FILES:
        path = folder / filename
        if not path.is_file():
            raise ModelFileError(f"{folder}: {filename} is missing")
        hashes[filename] = _check_hash(path, entry.files[filename], name=entry.name, remove=False)
    return hashes


def _check_hash(path: Path, expected: str, *, name: str, remove: bool) -> str:
    actual = sha256_of(path)
    if actual != expected:
        if remove:  # drop the bad cached copy so that the next try downloads it again
            real = path.resolve()
            path.unlink(missing_ok=True)
            real.unlink(missing_ok=True)
        raise ModelFileError(f"model {name!r}: {path.name} has sha256 {actual}, but the registry pins {expected}; "
                             "the file was refused" + (" and removed from the cache" if remove else ""))
    return actual
