"""Model specs to model folders: local folders, the registry, and the Hugging Face Hub.

One function, ``resolve_model``, turns what a user types after ``--model`` into a local folder with
``config.json`` and ``model.safetensors``:

1. ``hf://owner/name[@revision]``: always the Hub.
2. A path that exists (folder, or ``.safetensors`` beside its ``config.json``): that path, always;
   a Hub repo whose name is also a local path is written ``hf://owner/name``.
3. A model installed in the user's store (``uniseg weights download``, ``uniseg weights import --name``).
4. A registry name (``uniseg weights list``): its pinned Hub revision, verified against its sha256s,
   or its bundled folder; a release that is not installed yet is an error naming the command that
   installs it.
5. ``owner/name[@revision]``: the Hub (revision ``main`` if none).

No spec means the default model: ``$UNISEG_MODEL``, else the one ``uniseg weights default`` recorded
(the first install sets it), else an error naming the command that gets the published weights.

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
from typing import TYPE_CHECKING, Any

from uniseg_cli.errors import ModelFileError, UnisegError, UnknownNameError, UsageError, first_line

if TYPE_CHECKING:
    from uniseg_cli.config import UniSegConfig

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


def model_config(spec: str | Path | None) -> UniSegConfig:
    """The configuration of the model ``spec`` names (resolved as ``--model`` is), without torch."""
    from uniseg_cli.config import UniSegConfig

    return UniSegConfig.from_json_file(model_paths(resolve_model(spec).path)[0])


REGISTRY_VERSION = 2
log = logging.getLogger(__name__)
_HUB_NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
RELEASE_ROLES = ("checkpoint", "plans", "training-plans")  # the first two are what prediction needs


class RegistryError(UnisegError):
    """The shipped registry is malformed (a packaging bug, caught by the tests)."""


@dataclass(frozen=True)
class ReleaseFile:
    """One file as its authors published it: its name, where it is, and (once a maintainer pinned it) its sha256."""

    name: str
    role: str
    gdrive_id: str
    sha256: str | None = None


@dataclass(frozen=True)
class Release:
    """Weights published only as nnU-Net v1 pickles: fetched, converted once, stored as a model folder.

    ``architecture`` is the ``architecture`` object of the ``config.json`` the conversion must
    produce; with ``tensors`` and ``parameters`` it pins the published layout exactly.
    """

    homepage: str
    files: tuple[ReleaseFile, ...]
    architecture: dict[str, Any]
    tensors: int
    parameters: int

    def file(self, role: str) -> ReleaseFile:
        return next(f for f in self.files if f.role == role)


@dataclass(frozen=True)
class RegistryEntry:
    """One named model: pinned Hub files, a folder bundled inside the package, or a release to convert.

    An entry may carry both a release and a Hub copy (published later with the authors' permission):
    the Hub copy is then what downloads fetch, the release what it was made from.
    """

    name: str
    description: str
    tasks: tuple[str, ...]
    license: str
    files: dict[str, str] = field(default_factory=dict)
    repo: str | None = None
    revision: str | None = None
    path: str | None = None
    license_file: str | None = None
    release: Release | None = None

    @property
    def source(self) -> str:
        if self.path:
            return f"bundled:{self.path}"
        if self.repo:
            return f"{self.repo}@{self.revision}"
        return f"release:{self.release.homepage.removeprefix('https://github.com/')}" if self.release else ""

    @property
    def license_text(self) -> str | None:
        """The full licence a user must accept before the files are fetched (None: nothing to accept)."""
        if self.license_file is None:
            return None
        return (registry_folder() / self.license_file).read_text(encoding="utf-8")


@dataclass(frozen=True)
class Registry:
    models: dict[str, RegistryEntry]


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model spec led: the local folder, and the registry entry when there is one."""

    path: Path
    spec: str
    entry: RegistryEntry | None = None
    repo: str | None = None
    revision: str | None = None
    installed: bool = False  # found in the user's model store (``uniseg weights download`` / ``import --name``)


def registry_folder() -> Path:
    """The shipped model data: the top-level ``weights/`` folder, installed as ``uniseg_cli.weights_data``;
    running from a checkout (``python -m pytest`` imports the checkout's ``uniseg_cli``), the folder itself."""
    checkout = Path(__file__).resolve().parents[2] / "weights"
    if (checkout / "registry.json").is_file() and (checkout / "__init__.py").is_file():
        return checkout
    return Path(str(resources.files("uniseg_cli.weights_data")))


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

    if not isinstance(data, dict) or set(data) != {"format_version", "models"}:
        raise RegistryError(f"{source}: expected keys format_version, models")
    if data["format_version"] != REGISTRY_VERSION:
        raise RegistryError(f"{source}: format_version {data['format_version']!r} is not {REGISTRY_VERSION}")
    known_tasks = {t.key for t in UPSTREAM_TASKS}
    models = {}
    for name, raw in data["models"].items():
        where = f"{source}: model {name!r}"
        allowed = {"description", "tasks", "license", "license_file", "files", "repo", "revision", "path", "release"}
        if not isinstance(raw, dict) or set(raw) - allowed:
            raise RegistryError(f"{where}: unknown keys {sorted(set(raw) - allowed) if isinstance(raw, dict) else raw}")
        if "/" in name or "@" in name:
            raise RegistryError(f"{where}: a registry name has no '/' or '@' (those are Hub names)")
        entry = RegistryEntry(name=name, description=str(raw.get("description", "")),
                              tasks=tuple(raw.get("tasks", ())), license=str(raw.get("license", "")),
                              files=dict(raw.get("files", {})), repo=raw.get("repo"), revision=raw.get("revision"),
                              path=raw.get("path"), license_file=raw.get("license_file"),
                              release=_parse_release(raw["release"], where) if "release" in raw else None)
        if (entry.path is None) == (entry.repo is None and entry.release is None):
            raise RegistryError(f"{where}: give exactly one of path (bundled), or repo (Hub) and/or release")
        if entry.repo is not None and not (_HUB_NAME.match(entry.repo) and entry.revision and _COMMIT.match(entry.revision)):
            raise RegistryError(f"{where}: needs repo owner/name and revision pinned to a 40-hex commit")
        pinned = entry.path is not None or entry.repo is not None
        if pinned and (set(entry.files) != set(MODEL_FILES) or not all(_SHA256.match(h) for h in entry.files.values())):
            raise RegistryError(f"{where}: files must pin the sha256 of {', '.join(MODEL_FILES)}")
        if not pinned and entry.files:
            raise RegistryError(f"{where}: a release's files are listed under release.files")
        if not entry.tasks or set(entry.tasks) - known_tasks and not entry.path:
            raise RegistryError(f"{where}: tasks must be registry task keys, got {list(entry.tasks)}")
        if not entry.license:
            raise RegistryError(f"{where}: the licence of the weights is required")
        if entry.license_file is not None and not (registry_folder() / entry.license_file).is_file():
            raise RegistryError(f"{where}: license_file {entry.license_file} is not in the package")
        models[name] = entry
    return Registry(models=models)


def _parse_release(raw: Any, where: str) -> Release:
    keys = {"homepage", "files", "architecture", "tensors", "parameters"}
    if not isinstance(raw, dict) or set(raw) != keys:
        raise RegistryError(f"{where}: release needs exactly the keys {', '.join(sorted(keys))}")
    files = []
    for file_name, spec in raw["files"].items():
        if not isinstance(spec, dict) or set(spec) - {"role", "gdrive_id", "sha256"} or spec.get("role") not in RELEASE_ROLES:
            raise RegistryError(f"{where}: release file {file_name!r} needs role ({', '.join(RELEASE_ROLES)}), "
                                "gdrive_id and sha256 (null until pinned)")
        sha = spec.get("sha256")
        if sha is not None and not _SHA256.match(sha):
            raise RegistryError(f"{where}: release file {file_name!r}: sha256 must be 64 hex digits or null")
        files.append(ReleaseFile(name=file_name, role=spec["role"], gdrive_id=str(spec.get("gdrive_id", "")), sha256=sha))
    roles = [f.role for f in files]
    if sorted(roles) != sorted(set(roles)) or not {"checkpoint", "plans"} <= set(roles) or not all(f.gdrive_id for f in files):
        raise RegistryError(f"{where}: release files need one checkpoint and one plans file, each with a gdrive_id")
    from uniseg_cli.config import UniSegConfig
    from uniseg_cli.tasks import UPSTREAM_TASKS

    try:  # the architecture must be one this uniseg can build
        UniSegConfig.from_dict({"format": "uniseg", "format_version": 1, "architecture": raw["architecture"],
                                "tasks": [t.to_dict() for t in UPSTREAM_TASKS]})
    except UnisegError as exc:
        raise RegistryError(f"{where}: release architecture: {exc}") from None
    return Release(homepage=str(raw["homepage"]), files=tuple(files), architecture=dict(raw["architecture"]),
                   tensors=int(raw["tensors"]), parameters=int(raw["parameters"]))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_model(spec: str | Path | None, *, registry: Registry | None = None) -> ResolvedModel:
    """The local model folder for ``spec`` (see the module docstring); ``None`` means the default model."""
    from uniseg_cli.weights import store

    registry = registry or load_registry()
    if spec is None:
        default = store.default_model()
        if default is None:
            raise UsageError("no --model given and no default model set; get the published UniSeg weights with "
                             "`uniseg weights download uniseg-11task` (it becomes the default), or use the bundled "
                             "demonstration model with `-m uniseg-demo`")
        log.debug("default model %s (from %s)", default.spec, default.origin)
        try:
            return resolve_model(default.spec, registry=registry)
        except UnisegError as exc:
            exc.args = (f"{exc} (the default model, set by {default.origin})",)
            raise
    text = str(spec)
    if text.startswith("hf://"):
        return _from_hub(text, text[len("hf://"):])
    local = Path(text).expanduser()
    if local.exists():
        if text in registry.models or _HUB_NAME.match(text) or store.installed_folder(text):
            log.info("model %r: using the local path (write hf://%s for the Hub)", text, text)
        return ResolvedModel(path=local, spec=text)
    installed = store.installed_folder(text)
    if installed is not None:
        return ResolvedModel(path=installed, spec=text, entry=registry.models.get(text), installed=True)
    if text in registry.models:
        return from_registry(registry.models[text])
    if _HUB_NAME.match(text):
        return _from_hub(text, text)
    raise UnknownNameError("model", text, [*registry.models, *store.installed_names()],
                           kinds="no such folder or .safetensors file, installed or registry name, or Hub "
                                 "owner/name[@revision]")


def from_registry(entry: RegistryEntry) -> ResolvedModel:
    """A registry model's local folder: bundled, or fetched from the Hub; a release must be installed first."""
    if entry.path is not None:
        folder = registry_folder() / entry.path
        verify_files(folder, entry)
        return ResolvedModel(path=folder, spec=entry.name, entry=entry)
    if entry.repo is None:
        raise ModelFileError(f"model {entry.name!r} is not installed; get it once with "
                             f"`uniseg weights download {entry.name}` (licence: {entry.license})")
    require_accepted_license(entry)
    folder = download(entry.repo, entry.revision, name=entry.name, pins=entry.files)  # type: ignore[arg-type]
    return ResolvedModel(path=folder, spec=entry.name, entry=entry, repo=entry.repo, revision=entry.revision)


def require_accepted_license(entry: RegistryEntry) -> None:
    """Refuse to fetch weights whose licence the user has not accepted (``uniseg weights download`` asks)."""
    from uniseg_cli.weights import store

    text = entry.license_text
    if text is not None and store.license_acceptance(entry.name, text) is None:
        raise UsageError(f"model {entry.name!r}: its licence ({entry.license}) has not been accepted; read it with "
                         f"`uniseg weights info {entry.name}` and accept it with "
                         f"`uniseg weights download {entry.name} --accept-license`")


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
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo}@{revision}"
    label = f"{name!r}" + ("" if name.removeprefix("hf://") == where else f" ({where})")
    paths = []
    for filename in MODEL_FILES:
        try:
            paths.append(Path(hf_hub_download(repo, filename, revision=revision)))
        except LocalEntryNotFoundError as exc:
            raise ModelFileError(f"model {label} is not in the local cache and {_why_unreachable(exc)}; get it "
                                 f"with `uniseg weights download {name}` on a connected machine, or convert the "
                                 "original checkpoint with `uniseg weights import`") from None
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


def _why_unreachable(exc: BaseException) -> str:
    """Offline mode and a Hub that does not answer (a wrong ``HF_ENDPOINT``, no network) need different fixes."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "the Hub cannot be reached (offline: HF_HUB_OFFLINE is set)"
    cause = exc.__cause__ or exc.__context__
    return f"the Hub at {constants.ENDPOINT} cannot be reached ({first_line(cause) if cause else 'no answer'})"


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
