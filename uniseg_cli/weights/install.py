"""Installing models into the user's store: registry models fetched once, checkpoints imported by hand.

A registry entry with a Hub copy is fetched from the Hub (its pinned revision, into the Hugging Face
cache). A *release* (weights published only as nnU-Net v1 pickles, like UniSeg's on Google Drive) is
downloaded, checked against its pinned hashes and exact published layout, converted through the safe
import and its agreement check, and stored as ``<home>/models/<name>`` with a model card (licence,
acceptance, provenance) and a ``manifest.json`` recording the sha256 of every file it was made from
and made of, which ``uniseg weights verify`` compares against later. Nothing is stored unless every
check passed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uniseg_cli import __version__
from uniseg_cli.errors import CheckpointError, ModelFileError
from uniseg_cli.weights import store
from uniseg_cli.weights.hub import (
    MODEL_FILES,
    RegistryEntry,
    Release,
    from_registry,
    require_accepted_license,
    sha256_of,
)

if TYPE_CHECKING:
    import torch

    from uniseg_cli.config import UniSegConfig
    from uniseg_cli.model.checkpoint_import import ImportReport

log = logging.getLogger(__name__)

MIRROR_ENV = "UNISEG_WEIGHTS_MIRROR"


@dataclass(frozen=True)
class Installed:
    """Where a model ended up, and what installing it did."""

    name: str
    folder: Path
    already: bool = False              # it was installed before; nothing was fetched
    report: ImportReport | None = None
    became_default: bool = False


def install(entry: RegistryEntry, *, device: torch.device | str = "cpu", progress: bool = True,
            force: bool = False) -> Installed:
    """Fetch a registry model: its Hub copy when there is one, else its release (converted once)."""
    if entry.repo is not None or entry.release is None:  # the Hub, or a bundled folder: nothing to convert
        folder = from_registry(entry).path
        return Installed(entry.name, folder, became_default=entry.path is None and store.set_default_if_unset(entry.name))
    existing = store.installed_folder(entry.name)
    if existing is not None and not force:
        return Installed(entry.name, existing, already=True)
    require_accepted_license(entry)
    return _install_release(entry, entry.release, device=device, progress=progress)


def _install_release(entry: RegistryEntry, release: Release, *, device: torch.device | str, progress: bool) -> Installed:
    from uniseg_cli.model.checkpoint_import import import_checkpoint
    from uniseg_cli.weights.download import fetch

    downloads = store.download_folder(entry.name)
    mirror = os.environ.get(MIRROR_ENV, "").rstrip("/")
    sources: dict[str, dict[str, Any]] = {}
    for role in ("checkpoint", "plans"):
        published = release.file(role)
        url = f"{mirror}/{published.name}" if mirror else None
        path = fetch(downloads / published.name, url=url, gdrive_id=None if mirror else published.gdrive_id,
                     progress=progress)
        origin = url or f"https://drive.google.com/uc?id={published.gdrive_id}"
        digest = sha256_of(path)
        if published.sha256 is not None and digest != published.sha256:
            path.unlink()
            raise ModelFileError(f"{published.name}: sha256 {digest} is not the published file's {published.sha256} "
                                 f"(from {origin}); the file was removed and nothing was installed")
        sources[published.name] = {"role": role, "sha256": digest, "bytes": path.stat().st_size, "from": origin}

    text = entry.license_text
    accepted_at = store.license_acceptance(entry.name, text) if text is not None else None
    license_record = None if text is None else {"name": entry.license, "sha256": store.license_digest(text),
                                                "accepted_at": accepted_at}
    checkpoint = downloads / release.file("checkpoint").name
    try:
        report = import_checkpoint(
            checkpoint, store.model_folder(entry.name), plans=downloads / release.file("plans").name, device=device,
            overwrite=True, license=entry.license,
            source=f"Converted from {checkpoint.name} (sha256 {sources[checkpoint.name]['sha256']}) as published at "
                   f"{release.homepage}: {entry.description}",
            check=lambda config, state: check_layout(config, state, release, name=entry.name, source=checkpoint.name),
            annotate=lambda folder, report: _annotate(folder, report, name=entry.name, kind="release",
                                                      sources=sources, license_text=text, license=license_record))
    except (CheckpointError, ModelFileError):
        shutil.rmtree(downloads, ignore_errors=True)  # wrong files: a rerun must fetch them again, not reuse them
        raise
    shutil.rmtree(downloads, ignore_errors=True)
    folder = store.model_folder(entry.name)
    return Installed(entry.name, folder, report=report, became_default=store.set_default_if_unset(entry.name))


def import_to_store(checkpoint: Path, name: str, *, plans: Path | None, device: torch.device | str,
                    license: str, force: bool) -> Installed:
    """``uniseg weights import --name``: convert a checkpoint the user has into the store, under ``name``."""
    from uniseg_cli.errors import UnisegError
    from uniseg_cli.model.checkpoint_import import import_checkpoint

    folder = store.model_folder(name)
    if store.installed_folder(name) is not None and not force:
        raise UnisegError(f"model {name!r} is already installed in {folder} (use --force to replace it)")
    sources = {checkpoint.name: {"role": "checkpoint", "sha256": sha256_of(checkpoint), "from": str(checkpoint.resolve())}}
    if plans is not None:
        sources[plans.name] = {"role": "plans", "sha256": sha256_of(plans), "from": str(plans.resolve())}
    report = import_checkpoint(
        checkpoint, folder, plans=plans, device=device, overwrite=force, license=license,
        annotate=lambda tmp, report: _annotate(tmp, report, name=name, kind="import", sources=sources,
                                               license_text=None, license=None))
    return Installed(name, folder, report=report, became_default=store.set_default_if_unset(name))


def check_layout(config: UniSegConfig, state: Mapping[str, Any], release: Release, *, name: str, source: str) -> None:
    """Refuse weights that are not exactly the published model: architecture, tensor count, parameters."""
    got = config.to_dict()["architecture"]
    wrong = [f"{key} {got.get(key)} (published: {want})" for key, want in release.architecture.items()
             if got.get(key) != want]
    wrong += [f"{key} {got[key]} (published: none)" for key in got if key not in release.architecture]
    parameters = sum(int(t.numel()) for t in state.values())
    if len(state) != release.tensors:
        wrong.append(f"{len(state)} tensors (published: {release.tensors})")
    if parameters != release.parameters:
        wrong.append(f"{parameters:,} parameters (published: {release.parameters:,})")
    if wrong:
        raise CheckpointError(f"{source}: not the published {name} weights: " + "; ".join(wrong[:3])
                              + (f"; … {len(wrong) - 3} more" if len(wrong) > 3 else ""))


def _annotate(folder: Path, report: ImportReport, *, name: str, kind: str, sources: dict[str, dict[str, Any]],
              license_text: str | None, license: dict[str, Any] | None) -> None:
    """The model card and manifest of an installed model, written beside its weights before it is renamed."""
    from uniseg_cli.weights.model_card import model_card

    installed_at = store.now()
    manifest = {
        "name": name, "kind": kind, "installed_at": installed_at, "installed_with": f"uniseg {__version__}",
        "sources": sources, "converted": {f: sha256_of(folder / f) for f in MODEL_FILES},
        "license": license, "agreement_max_abs_diff": report.max_abs_diff,
        "plans_disagreements": report.plans_disagreements,
    }
    (folder / store.MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    lines = ["", f"Installed by uniseg {__version__} on {installed_at} from:", ""]
    lines += [f"- `{file}` ({info['role']}), sha256 `{info['sha256']}`, from {info['from']}" for file, info in sources.items()]
    if license is not None:
        lines += ["", f"Licence accepted by the user on {license['accepted_at']}."]
    lines += ["", f"Converted files and their sha256 are in `{store.MANIFEST_NAME}`; `uniseg weights verify {name}` "
                  "checks them.", ""]
    card = model_card(report.config, repo=name, parameters=report.parameters, license_text=license_text,
                      provenance="\n".join(lines))
    (folder / "README.md").write_text(card, encoding="utf-8")
