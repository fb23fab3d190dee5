"""Model specs, the registry and Hub downloads, against a local Hub server (no network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hub_server import FakeHub

from uniseg_cli.errors import ModelFileError, UsageError
from uniseg_cli.weights.hub import (
    Registry,
    RegistryError,
    load_registry,
    parse_registry,
    registry_folder,
    resolve_model,
    sha256_of,
    verify_files,
)

REPO = "uniseg-test/tiny"


@pytest.fixture
def hub(tmp_path, monkeypatch, small_model_dir, coarse_model_dir):
    """A running local Hub with two commits of a real model folder; the client pointed at it."""
    from huggingface_hub import constants

    server = FakeHub()
    first = server.add_commit(REPO, {f: (small_model_dir / f).read_bytes() for f in ("config.json", "model.safetensors")})
    second = server.add_commit(REPO, {f: (coarse_model_dir / f).read_bytes() for f in ("config.json", "model.safetensors")})
    server.start()
    cache = tmp_path / "hf-cache"
    # In this process huggingface_hub read HF_ENDPOINT at import; the subprocess test sets the variables.
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server.commits = (first, second)
    server.cache = cache
    yield server
    server.stop()


def _entry(commit, folder, **changes):
    pins = {f: sha256_of(folder / f) for f in ("config.json", "model.safetensors")}
    entry = {"description": "tiny test model", "repo": REPO, "revision": commit, "files": pins,
             "tasks": ["liver", "kidney"], "license": "Apache-2.0"} | changes
    return parse_registry({"format_version": 2, "models": {"tiny": entry}})


def test_download_with_env_vars_then_offline_from_the_cache(hub, tmp_path, small_model_dir):
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "env-cache"), HF_HUB_OFFLINE="0")
    first = hub.commits[0]
    result = subprocess.run([sys.executable, "-m", "uniseg_cli", "weights", "download", f"{REPO}@{first}"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    folder = result.stdout.strip()
    assert folder.startswith(str(tmp_path / "env-cache")) and folder.endswith(first)
    assert open(f"{folder}/model.safetensors", "rb").read() == (small_model_dir / "model.safetensors").read_bytes()
    hub.stop()  # the Hub is gone: the cache must serve
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-m", "uniseg_cli", "weights", "info", f"{REPO}@{first}", "--json"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["path"] == folder and info["parameters"] == 399_545 and info["source"].startswith(f"{REPO}@{first}")


def test_pinned_revision_gets_that_commit(hub, small_model_dir, coarse_model_dir):
    first, second = hub.commits
    old = resolve_model(f"{REPO}@{first}")
    new = resolve_model(f"hf://{REPO}")                     # main = the second commit
    assert old.path.name == first and new.path.name == second and new.revision == "main"
    assert (old.path / "config.json").read_bytes() == (small_model_dir / "config.json").read_bytes()
    assert (new.path / "config.json").read_bytes() == (coarse_model_dir / "config.json").read_bytes()


def test_cached_registry_model_needs_no_requests(hub, monkeypatch, small_model_dir):
    from huggingface_hub import constants

    registry = _entry(hub.commits[0], small_model_dir)
    monkeypatch.setenv("UNISEG_MODEL", "tiny")
    resolved = resolve_model(None, registry=registry)        # the default model
    assert resolved.entry.name == "tiny" and resolved.path.name == hub.commits[0]
    count = len(hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.stop()
    assert resolve_model("tiny", registry=registry).path == resolved.path
    assert len(hub.requests) == count


def test_sha256_mismatch_is_refused_and_removed_from_the_cache(hub, small_model_dir):
    registry = _entry(hub.commits[0], small_model_dir)
    registry.models["tiny"].files["model.safetensors"] = "0" * 64
    with pytest.raises(ModelFileError, match=r"model 'tiny': model.safetensors has sha256 [0-9a-f]{64}, but the registry "
                                             r"pins 0{64}; the file was refused and removed from the cache"):
        resolve_model("tiny", registry=registry)
    assert not list(hub.cache.rglob("model.safetensors"))


def test_hub_errors_are_one_clear_line(hub, monkeypatch):
    from huggingface_hub import constants

    with pytest.raises(ModelFileError, match=r"Hub repository nobody/nothing not found .* \(there is no local folder "
                                             r"'nobody/nothing' either\)"):
        resolve_model("nobody/nothing")
    with pytest.raises(ModelFileError, match="revision 'v9' not found in uniseg-test/tiny"):
        resolve_model(f"{REPO}@v9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelFileError, match=r"is not in the local cache and the Hub cannot be reached \(offline: "
                                             r"HF_HUB_OFFLINE is set\); get it with `uniseg weights download "
                                             r"uniseg-test/tiny@main`"):
        resolve_model(f"{REPO}@main")


def test_an_unreachable_endpoint_is_not_called_offline(monkeypatch):
    """A wrong HF_ENDPOINT used to read "(offline)", which sends the user looking for HF_HUB_OFFLINE."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")          # the discard port: nothing listens
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(_http.time, "sleep", lambda seconds: None)            # huggingface_hub's retries, at once
    with pytest.raises(ModelFileError, match=r"the Hub at http://127.0.0.1:9 cannot be reached \(.*[Cc]onnection "
                                             r"refused.*\); get it with"):
        resolve_model("nobody/absent@main")


def test_predict_with_a_hub_model(hub, run_cli, tmp_path):
    from conftest import CT

    code, out, err = run_cli("predict", CT, "-t", "spleen", "-m", f"{REPO}@{hub.commits[1]}", "-o", tmp_path,
                             "--no-tta", "--json")
    assert code == 0, err
    assert json.loads(out)["task"] == "spleen"


def test_model_specs_without_the_hub(tmp_path, small_model_dir, monkeypatch):
    empty = Registry(models={})
    assert resolve_model(str(small_model_dir), registry=empty).path == small_model_dir
    assert resolve_model(str(small_model_dir / "model.safetensors"), registry=empty).path.name == "model.safetensors"
    with pytest.raises(UsageError, match="no --model given and no default model set"):
        resolve_model(None, registry=empty)
    with pytest.raises(UsageError, match=r"unknown model 'not-a-model' \(no such folder"):
        resolve_model("not-a-model", registry=empty)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)            # a local folder wins over the Hub name
    assert resolve_model("owner/name", registry=empty).path.name == "name"


def test_shipped_registry_is_valid():
    registry = load_registry()
    for entry in registry.models.values():   # each entry: pinned revision, both hashes, known tasks, licence
        assert entry.license and entry.tasks
        assert entry.path or entry.release or (entry.repo and len(entry.revision) == 40)
        if entry.path:                       # a bundled model ships with the hashes the registry pins
            verify_files(registry_folder() / entry.path, entry)


@pytest.mark.parametrize("change,message", [
    ({"revision": "main"}, "revision pinned to a 40-hex commit"),
    ({"files": {"config.json": "ab" * 32}}, "files must pin the sha256"),
    ({"tasks": ["kidney", "elbow"]}, "tasks must be registry task keys"),
    ({"license": ""}, "licence of the weights is required"),
    ({"weights": "x"}, "unknown keys"),
])
def test_bad_registry_entries_are_refused(small_model_dir, change, message):
    with pytest.raises(RegistryError, match=message):
        _entry("a" * 40, small_model_dir, **change)


def test_push_prepares_the_folder_with_a_model_card(small_model_dir):
    # The upload itself (HfApi.upload_folder: preupload, LFS and commit endpoints) is not served by the
    # local Hub; what is uploaded is checked here.
    import shutil

    from uniseg_cli.weights.catalog import prepare_upload

    staging = prepare_upload(small_model_dir, "someone/uniseg-tiny")
    try:
        assert sorted(p.name for p in staging.iterdir()) == ["README.md", "config.json", "model.safetensors"]
        card = (staging / "README.md").read_text()
        assert card.startswith("---\nlibrary_name: uniseg\n") and "# uniseg-tiny" in card
        assert "| 1 | `kidney` | CT | kidney, kidney tumour | 3 × 1.5 × 1.5 |" in card
        assert "not stated: ask the model's authors" in card and "399,545 parameters" in card
        assert sorted(p.name for p in small_model_dir.iterdir()) == [".uniseg-written.json", "config.json",
                                                                     "model.safetensors"]
    finally:
        shutil.rmtree(staging)
