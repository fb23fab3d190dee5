"""What the ``uniseg weights`` commands report and do: list, describe, verify and publish models."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from uniseg_cli.errors import UnisegError
from uniseg_cli.hub import MODEL_FILES, load_registry, model_paths, registry_folder, resolve_model, sha256_of, verify_files


def list_models() -> list[dict[str, Any]]:
    """Registry entries (with whether they are cached) and other uniseg models found in the HF cache."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    registry = load_registry()
    try:
        repos = {r.repo_id: r for r in scan_cache_dir().repos if r.repo_type == "model"}
    except CacheNotFound:
        repos = {}
    listed = []
    for entry in registry.models.values():
        cached = None
        if entry.path is not None:
            folder = registry_folder() / entry.path  # listing sizes needs no re-hash of bundled files
            cached = sum((folder / f).stat().st_size for f in MODEL_FILES if (folder / f).is_file()) / 2**20
        elif entry.repo in repos:
            for revision in repos[entry.repo].revisions:
                if revision.commit_hash == entry.revision:
                    cached = revision.size_on_disk / 2**20
        listed.append({"name": entry.name, "source": entry.source, "tasks": list(entry.tasks),
                       "license": entry.license, "cached_mib": cached, "default": entry.name == registry.default})
    pinned = {e.repo for e in registry.models.values()}
    for repo_id, repo in sorted(repos.items()):
        if repo_id in pinned:
            continue
        for revision in repo.revisions:
            names = {f.file_name: f.file_path for f in revision.files}
            if not set(MODEL_FILES) <= set(names):
                continue
            try:
                config = json.loads(Path(names["config.json"]).read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if config.get("format") != "uniseg":
                continue
            listed.append({"name": f"{repo_id}@{revision.commit_hash[:12]}", "source": f"{repo_id}@{revision.commit_hash}",
                           "tasks": [t.get("key") for t in config.get("tasks", [])], "license": config.get("license", ""),
                           "cached_mib": revision.size_on_disk / 2**20, "default": False})
    return listed


def describe_model(spec: str) -> dict[str, Any]:
    """Configuration, tasks, parameter count, licence and source of a model (loaded on the meta device)."""
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
    return {"spec": spec, "path": str(resolved.path), "source": source,
            "license": config.license or (resolved.entry.license if resolved.entry else ""),
            "parameters": parameters, "stage_features": list(config.stage_features),
            "weights_mib": round(weights_path.stat().st_size / 2**20, 2), "config": config.to_dict()}


def verify_model(spec: str) -> list[str]:
    """``sha256  file`` lines; registry models are checked against their pins (a mismatch raises)."""
    resolved = resolve_model(spec)
    if resolved.entry is not None:
        hashes = verify_files(resolved.path, resolved.entry)
        return [f"{h}  {name}  OK (pinned in the registry as {resolved.entry.name})" for name, h in hashes.items()]
    return [f"{sha256_of(path)}  {path.name}  (not in the registry: nothing to compare with)"
            for path in model_paths(resolved.path)]


def prepare_upload(folder: Path, repo: str) -> Path:
    """A temporary copy of a model folder with its generated model card, checked by loading it."""
    from uniseg_cli.model.files import load_model
    from uniseg_cli.model_card import model_card

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
