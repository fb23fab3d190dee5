"""What the ``uniseg weights`` commands report and do: list, describe, verify and publish models."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from uniseg_cli.errors import UnisegError
from uniseg_cli.weights import store
from uniseg_cli.weights.hub import (
    MODEL_FILES,
    RegistryEntry,
    load_registry,
    model_paths,
    registry_folder,
    resolve_model,
    sha256_of,
    verify_files,
)


def list_models() -> list[dict[str, Any]]:
    """Registry entries (with whether they are installed), models in the user's store, and other uniseg
    models found in the Hugging Face cache; ``default`` marks the one used without ``--model``."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    registry = load_registry()
    default = store.default_model()
    try:
        repos = {r.repo_id: r for r in scan_cache_dir().repos if r.repo_type == "model"}
    except CacheNotFound:
        repos = {}
    listed = []
    for entry in registry.models.values():
        installed = None
        folder = registry_folder() / entry.path if entry.path is not None else store.installed_folder(entry.name)
        if folder is not None:  # listing sizes needs no re-hash
            installed = _size_mib(folder)
        elif entry.repo in repos:
            for revision in repos[entry.repo].revisions:
                if revision.commit_hash == entry.revision:
                    installed = revision.size_on_disk / 2**20
        listed.append({"name": entry.name, "source": entry.source, "tasks": list(entry.tasks),
                       "license": entry.license, "installed_mib": installed})
    for name in store.installed_names():
        if name in registry.models:
            continue
        folder = store.model_folder(name)
        config = _read_config(folder / "config.json")
        origin = ", ".join(store.read_manifest(folder).get("sources", {})) or "?"
        listed.append({"name": name, "source": f"imported:{origin}", "tasks": [t.get("key") for t in config.get("tasks", [])],
                       "license": config.get("license", ""), "installed_mib": _size_mib(folder)})
    pinned = {e.repo for e in registry.models.values()}
    for repo_id, repo in sorted(repos.items()):
        if repo_id in pinned:
            continue
        for revision in repo.revisions:
            names = {f.file_name: f.file_path for f in revision.files}
            if not set(MODEL_FILES) <= set(names):
                continue
            config = _read_config(Path(names["config.json"]))
            if config.get("format") != "uniseg":
                continue
            listed.append({"name": f"{repo_id}@{revision.commit_hash[:12]}", "source": f"{repo_id}@{revision.commit_hash}",
                           "tasks": [t.get("key") for t in config.get("tasks", [])], "license": config.get("license", ""),
                           "installed_mib": revision.size_on_disk / 2**20})
    for model in listed:
        model["default"] = default is not None and default.spec in (model["name"], model["source"])
    return listed


def _size_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_model(spec: str | None) -> dict[str, Any]:
    """Configuration, tasks, parameter count, licence and source of a model (loaded on the meta device).

    A registry release that is not installed yet is described from the registry: its published files,
    the architecture they must have and the licence to accept.
    """
    registry = load_registry()
    entry = registry.models.get(spec) if spec is not None else None
    if entry is not None and entry.release is not None and not _available(entry) and not Path(spec).exists():
        release = entry.release
        return {"spec": spec, "path": None, "installed": False, "source": entry.source, "license": entry.license,
                "license_text": entry.license_text, "description": entry.description, "tasks": list(entry.tasks),
                "parameters": release.parameters,
                "release": {"homepage": release.homepage, "tensors": release.tensors, "architecture": release.architecture,
                            "files": [{"name": f.name, "role": f.role, "gdrive_id": f.gdrive_id, "sha256": f.sha256}
                                      for f in release.files]}}
    import torch

    from uniseg_cli.config import UniSegConfig
    from uniseg_cli.model.network import UniSeg

    resolved = resolve_model(spec)
    config_path, weights_path = model_paths(resolved.path)
    config = UniSegConfig.from_json_file(config_path)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in UniSeg(config).parameters())
    source = config.source
    if resolved.repo:
        source = f"{resolved.repo}@{resolved.revision}" + (f" ({source})" if source else "")
    entry = resolved.entry
    return {"spec": resolved.spec, "path": str(resolved.path), "installed": True, "source": source,
            "license": config.license or (entry.license if entry else ""),
            "license_text": entry.license_text if entry else None,
            "parameters": parameters, "stage_features": list(config.stage_features),
            "weights_mib": round(weights_path.stat().st_size / 2**20, 2), "config": config.to_dict()}


def _available(entry: RegistryEntry) -> bool:
    """Whether resolving the entry would find it without asking the user anything (installed, or a Hub copy
    whose licence was accepted: the Hub cache fetches it)."""
    if store.installed_folder(entry.name) is not None:
        return True
    text = entry.license_text
    return entry.repo is not None and (text is None or store.license_acceptance(entry.name, text) is not None)


def verify_model(spec: str | None) -> tuple[list[str], list[str]]:
    """``sha256  file  verdict`` lines, against the registry's pins or what the install recorded, and the
    names of the files that no longer match (empty when all do)."""
    resolved = resolve_model(spec)
    if resolved.entry is not None and not resolved.installed:
        hashes = verify_files(resolved.path, resolved.entry)  # raises on the first mismatch
        return [f"{h}  {name}  OK (pinned in the registry as {resolved.entry.name})" for name, h in hashes.items()], []
    manifest = store.read_manifest(resolved.path) if resolved.installed else {}
    if not manifest:
        return [f"{sha256_of(path)}  {path.name}  (not in the registry and not installed: nothing to compare with)"
                for path in model_paths(resolved.path)], []
    lines, changed = [], []
    for name, recorded in manifest.get("converted", {}).items():
        path = resolved.path / name
        actual = sha256_of(path) if path.is_file() else "(missing)"
        ok = actual == recorded
        lines.append(f"{actual}  {name}  " + ("OK (as installed)" if ok else f"CHANGED (installed as {recorded})"))
        if not ok:
            changed.append(name)
    release = resolved.entry.release if resolved.entry is not None else None
    pins = {f.name: f.sha256 for f in release.files} if release is not None else {}
    for name, info in manifest.get("sources", {}).items():
        pin = pins.get(name)
        verdict = ("not pinned in the registry" if pin is None else
                   "OK (pinned in the registry)" if pin == info["sha256"] else f"DIFFERS from the registry's pin {pin}")
        lines.append(f"{info['sha256']}  {name}  converted from, {verdict}")
    return lines, changed


def prepare_upload(folder: Path, repo: str) -> Path:
    """A temporary copy of a model folder with its generated model card, checked by loading it."""
    from uniseg_cli.model.files import load_model
    from uniseg_cli.weights.model_card import model_card

    model = load_model(folder, device="cpu")  # refuses folders whose weights do not match their config
    staging = Path(tempfile.mkdtemp(prefix="uniseg-push-"))
    for name in MODEL_FILES:
        shutil.copy2(folder / name, staging / name)
    parameters = sum(p.numel() for p in model.parameters())
    (staging / "README.md").write_text(model_card(model.config, repo=repo, parameters=parameters), encoding="utf-8")
    return staging


def push_model(folder: Path, repo: str, *, private: bool, message: str) -> str:
    """Upload a model folder plus model card; returns the commit's URL and hash for the registry."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    staging = prepare_upload(folder, repo)
    try:
        api = HfApi()
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo, folder_path=staging, repo_type="model", commit_message=message)
    except HfHubHTTPError as exc:
        raise UnisegError(f"{repo}: upload failed ({str(exc).splitlines()[0]})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return f"{commit.commit_url}  revision {commit.oid}"
