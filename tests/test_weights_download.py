"""`uniseg weights download` of a release, the licence, the model store and the default model.

The published files are served by a mirror on 127.0.0.1 (``UNISEG_WEIGHTS_MIRROR``), in the official
nnU-Net v1 format, from a tiny network: the registry entry under test is the shipped ``uniseg-11task``
with only its pinned architecture swapped for the tiny one (the shipped architecture itself is checked
against the published key list at the end, without a download).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CT, DATA
from file_server import FileServer
from test_checkpoint_import import nnunet_v1_checkpoint, plans_file
from test_hub import hub as hub_server  # noqa: F401  (the local Hub fixture)

from uniseg_cli.config import UniSegConfig, small_config
from uniseg_cli.model.network import UniSeg
from uniseg_cli.weights import hub

NAME = "uniseg-11task"
CHECKPOINT, PLANS = "model_final_checkpoint.model", "model_final_checkpoint.model.pkl"


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, bytes]:
    """The two files as the UniSeg authors publish them, for a tiny network."""
    folder = tmp_path_factory.mktemp("published")
    torch.manual_seed(0)
    torch.save(nnunet_v1_checkpoint(UniSeg(small_config())), folder / CHECKPOINT)
    plans_file(folder / PLANS)
    return {CHECKPOINT: (folder / CHECKPOINT).read_bytes(), PLANS: (folder / PLANS).read_bytes()}


@pytest.fixture
def registry(monkeypatch) -> hub.Registry:
    """The shipped registry, its release pinned to the tiny network's layout."""
    from uniseg_cli.weights import catalog

    shipped = hub.load_registry()
    with torch.device("meta"):
        tiny = UniSeg(small_config())
    release = dataclasses.replace(shipped.models[NAME].release, architecture=small_config().to_dict()["architecture"],
                                  tensors=len(tiny.state_dict()), parameters=sum(p.numel() for p in tiny.parameters()))
    models = dict(shipped.models, **{NAME: dataclasses.replace(shipped.models[NAME], release=release)})
    registry = hub.Registry(models=models)
    monkeypatch.setattr(hub, "load_registry", lambda path=None: registry)
    monkeypatch.setattr(catalog, "load_registry", lambda path=None: registry)
    return registry


@pytest.fixture
def mirror(published, monkeypatch, registry):
    server = FileServer(published).start()
    monkeypatch.setenv("UNISEG_WEIGHTS_MIRROR", server.url + "/")
    yield server
    server.stop()


def _stored(home: Path) -> list[str]:
    models = home / "models"
    return sorted(p.name for p in models.iterdir()) if models.is_dir() else []


def _last(err: str) -> str:
    """The error line (log lines and the licence text come before it on stderr)."""
    return err.strip().splitlines()[-1]


def test_the_licence_must_be_accepted_and_nothing_is_fetched_before(run_cli, mirror, user_home):
    code, out, err = run_cli("weights", "download", NAME)         # stdin is not a terminal under pytest
    assert code == 2 and out == ""
    assert err.strip() == (f"Error: {NAME}: its licence must be accepted first (UniSeg licence: non-commercial use "
                           f"only (commercial licence from the authors)): read it with `uniseg weights info {NAME}`, "
                           f"then run `uniseg weights download {NAME} --accept-license`")
    assert mirror.requests == [] and _stored(user_home) == [] and not (user_home / "settings.json").exists()
    code, out, _ = run_cli("weights", "info", NAME)              # the licence, in full, before any download
    assert code == 0 and "UniSeg for non-commercial purposes" in out and "not installed" in out
    assert "Google Drive id 1Ldgd5Ebc8VQrvGIpIgzUG2PTSDPUpEQJ" in out


def test_answering_no_on_a_terminal_stores_nothing(run_cli, mirror, user_home, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("typer.confirm", lambda *args, **kwargs: False)
    code, _, err = run_cli("weights", "download", NAME)
    assert code == 1 and "UniSeg for non-commercial purposes" in err
    assert err.strip().endswith(f"Error: {NAME}: licence not accepted; nothing was downloaded")
    assert mirror.requests == [] and _stored(user_home) == []


def test_download_converts_stores_and_becomes_the_default(run_cli, mirror, user_home, published, tmp_path):
    code, out, err = run_cli("weights", "download", NAME, "--accept-license", "--device", "cpu")
    assert code == 0, err
    folder = user_home / "models" / NAME
    assert out.strip() == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == [".uniseg-written.json", "README.md", "config.json",
                                                        "manifest.json", "model.safetensors"]
    assert f"{NAME} is now the default model" in err and "max |diff| = 0" in err
    assert not (user_home / "downloads" / NAME).exists()          # the pickles are gone once converted

    import hashlib

    manifest = json.loads((folder / "manifest.json").read_text())
    for name, content in published.items():
        assert manifest["sources"][name]["sha256"] == hashlib.sha256(content).hexdigest()
        assert manifest["sources"][name]["from"] == f"{mirror.url}/{name}"
    assert manifest["converted"] == {f: hub.sha256_of(folder / f) for f in ("config.json", "model.safetensors")}
    settings = json.loads((user_home / "settings.json").read_text())
    assert settings["default_model"] == NAME
    assert manifest["license"]["accepted_at"] == settings["accepted_licenses"][NAME]["accepted_at"]
    card = (folder / "README.md").read_text()
    assert "UniSeg for non-commercial purposes" in card and "Licence accepted by the user on" in card
    config = UniSegConfig.from_json_file(folder / "config.json")
    assert config.license.startswith("UniSeg licence: non-commercial") and "github.com/yeerwen/UniSeg" in config.source

    code, out, err = run_cli("weights", "list", "--json")
    listed = {m["name"]: m for m in json.loads(out)}
    assert listed[NAME]["default"] and listed[NAME]["installed_mib"] > 0 and not listed["uniseg-demo"]["default"]
    code, out, err = run_cli("weights", "verify")                  # the default model, against the manifest
    assert code == 0, err
    assert f"{manifest['converted']['model.safetensors']}  model.safetensors  OK (as installed)" in out
    assert f"{manifest['sources'][CHECKPOINT]['sha256']}  {CHECKPOINT}  converted from, not pinned in the registry" in out

    requests = len(mirror.requests)                               # asked once: no flag, no question, no download
    code, out, err = run_cli("weights", "download", NAME)
    assert code == 0 and out.strip() == str(folder) and "already installed" in err
    assert len(mirror.requests) == requests

    with (folder / "model.safetensors").open("r+b") as f:         # a changed file is caught later
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    code, out, err = run_cli("weights", "verify", NAME)
    assert code == 1 and "model.safetensors  CHANGED (installed as" in out
    assert err.startswith("Error: model.safetensors changed since the model was installed")


def test_predict_needs_no_model_option_and_no_network_once_installed(run_cli, mirror, tmp_path, published):
    code, _, err = run_cli("weights", "download", NAME, "--accept-license", "--device", "cpu")
    assert code == 0, err
    mirror.stop()
    fast = ("--no-tta", "--step", "1")      # the tiny net at the published spacing: 64 tiles, not 250
    code, _, err = run_cli("predict", CT, "--task", "kidney", "-o", tmp_path / "default.nii.gz", *fast)
    assert code == 0, err
    (tmp_path / CHECKPOINT).write_bytes(published[CHECKPOINT])    # the same checkpoint, imported by hand
    code, _, err = run_cli("weights", "import", tmp_path / CHECKPOINT, "-o", tmp_path / "by-hand", "--device", "cpu")
    assert code == 0, err
    code, _, err = run_cli("predict", CT, "--task", "kidney", "-m", tmp_path / "by-hand", "-o", tmp_path / "m.nii.gz",
                           *fast)
    assert code == 0, err
    default, by_hand = (np.asarray(nib.load(tmp_path / n).dataobj) for n in ("default.nii.gz", "m.nii.gz"))
    assert default.any() and np.array_equal(default, by_hand)


def test_an_interrupted_download_leaves_no_model_and_a_rerun_resumes(run_cli, mirror, user_home, monkeypatch, published):
    from uniseg_cli.weights import download

    monkeypatch.setattr(download, "RETRIES", 0)
    cut = 2 * 512 * 1024 + 1000                                    # the network fails mid-file (gdown reads 512 KiB chunks)
    mirror.cut_after = cut
    code, out, err = run_cli("weights", "download", NAME, "--accept-license", "--device", "cpu")
    assert code == 1 and out == ""
    error = _last(err)
    assert error.startswith(f"Error: {CHECKPOINT}: download from {mirror.url}/{CHECKPOINT} stopped (")
    assert error.endswith("run the same command again to resume it")
    assert _stored(user_home) == []
    partial = list((user_home / "downloads" / NAME).glob(f"{CHECKPOINT}*.part"))
    assert len(partial) == 1
    received = partial[0].stat().st_size
    assert 0 < received <= cut

    mirror.cut_after = None
    mirror.requests.clear()
    code, out, err = run_cli("weights", "download", NAME, "--device", "cpu")   # accepted once already
    assert code == 0, err
    assert ("GET", f"/{CHECKPOINT}", f"bytes={received}-") in mirror.requests
    assert _stored(user_home) == [NAME]
    manifest = json.loads((user_home / "models" / NAME / "manifest.json").read_text())
    import hashlib

    assert manifest["sources"][CHECKPOINT]["sha256"] == hashlib.sha256(published[CHECKPOINT]).hexdigest()


def test_a_server_without_ranges_gets_the_file_again_from_the_start(run_cli, mirror, user_home, monkeypatch):
    from uniseg_cli.weights import download

    monkeypatch.setattr(download, "RETRIES", 0)
    mirror.cut_after, mirror.ranges = 2 * 512 * 1024 + 1000, False
    code, _, _ = run_cli("weights", "download", NAME, "--accept-license", "--device", "cpu")
    assert code == 1
    mirror.cut_after = None
    code, _, err = run_cli("weights", "download", NAME, "--device", "cpu")
    assert code == 0, err
    assert "cannot resume; downloading it again from the start" in err and _stored(user_home) == [NAME]


def test_tampered_files_are_refused_and_nothing_is_stored(run_cli, mirror, registry, user_home, published, tmp_path):
    checkpoint = nnunet_v1_checkpoint(UniSeg(small_config()))
    checkpoint["state_dict"]["fusion_layer.blocks.0.conv.weight"] = torch.zeros(1, 1, 3, 3, 3)   # one shape off
    path = tmp_path / "bad.model"
    torch.save(checkpoint, path)
    mirror.files[CHECKPOINT] = path.read_bytes()
    code, out, err = run_cli("weights", "download", NAME, "--accept-license", "--device", "cpu")
    assert code == 1 and out == ""
    assert _last(err).startswith(
        f"Error: {user_home / 'downloads' / NAME / CHECKPOINT}: does not match its configuration: 1 tensor(s) with "
        "another shape (fusion_layer.blocks.0.conv.weight: file (1, 1, 3, 3, 3)")
    assert _stored(user_home) == [] and not (user_home / "downloads" / NAME).exists()
    assert "default_model" not in json.loads((user_home / "settings.json").read_text())

    checkpoint = nnunet_v1_checkpoint(UniSeg(small_config()))
    checkpoint["state_dict"]["extra_head.weight"] = torch.zeros(3)                          # one key too many
    torch.save(checkpoint, path)
    mirror.files[CHECKPOINT] = path.read_bytes()
    code, _, err = run_cli("weights", "download", NAME, "--device", "cpu")
    assert code == 1 and "does not match its configuration: 1 tensor(s) unexpected (extra_head.weight)" in _last(err)
    assert _stored(user_home) == []

    wider = nnunet_v1_checkpoint(UniSeg(small_config().with_changes(base_features=8)))   # a consistent, other net
    torch.save(wider, path)
    mirror.files[CHECKPOINT] = path.read_bytes()
    code, _, err = run_cli("weights", "download", NAME, "--device", "cpu")
    assert code == 1 and _last(err) == (f"Error: {CHECKPOINT}: not the published {NAME} weights: base_features 8 "
                                        "(published: 4); 542,589 parameters (published: 399,545)")
    assert _stored(user_home) == []

    pinned = dataclasses.replace(registry.models[NAME].release.files[0], sha256="0" * 64)   # a maintainer's pin
    release = registry.models[NAME].release
    registry.models[NAME] = dataclasses.replace(registry.models[NAME], release=dataclasses.replace(
        release, files=(pinned, *release.files[1:])))
    mirror.files[CHECKPOINT] = published[CHECKPOINT]
    code, _, err = run_cli("weights", "download", NAME, "--device", "cpu")
    assert code == 1 and _last(err).startswith(f"Error: {CHECKPOINT}: sha256 ")
    assert f"is not the published file's {'0' * 64}" in err and _stored(user_home) == []


def test_without_a_default_the_error_names_the_fix(run_cli, tmp_path):
    code, out, err = run_cli("predict", CT, "--task", "kidney", "-o", tmp_path / "k.nii.gz")
    assert code == 2 and out == ""
    assert err.strip() == ("Error: no --model given and no default model set; get the published UniSeg weights with "
                           "`uniseg weights download uniseg-11task` (it becomes the default), or use the bundled "
                           "demonstration model with `-m uniseg-demo`")
    code, out, err = run_cli("predict", CT, "--task", "kidney", "-m", NAME, "-o", tmp_path / "k.nii.gz")
    assert code == 1 and f"model '{NAME}' is not installed; get it once with `uniseg weights download {NAME}`" in err


def test_model_option_beats_the_environment_beats_the_default(run_cli, monkeypatch, small_model_dir, coarse_model_dir,
                                                              tmp_path, user_home):
    from uniseg_cli.weights.hub import resolve_model

    code, out, err = run_cli("weights", "default", small_model_dir)
    assert code == 0 and out.strip() == str(small_model_dir) and "set by `uniseg weights default`" in err
    assert resolve_model(None).path == small_model_dir
    monkeypatch.setenv("UNISEG_MODEL", "uniseg-demo")
    assert resolve_model(None).spec == "uniseg-demo"
    code, out, err = run_cli("weights", "default")
    assert out.strip() == "uniseg-demo" and "set by $UNISEG_MODEL" in err
    assert resolve_model(str(coarse_model_dir)).path == coarse_model_dir

    code, out, err = run_cli("predict", CT, "--task", "spleen", "-o", tmp_path / "env", "--json", "--fast")
    assert code == 0, err
    monkeypatch.setenv("UNISEG_MODEL", "no-such-model")
    code, _, err = run_cli("predict", CT, "--task", "spleen", "-o", tmp_path / "x")
    assert code == 2 and err.strip().endswith("(the default model, set by $UNISEG_MODEL)")
    monkeypatch.delenv("UNISEG_MODEL")
    code, _, err = run_cli("weights", "default", "--unset")
    assert code == 0 and "no default model" in err
    code, _, err = run_cli("weights", "default", tmp_path / "absent")
    assert code == 2 and "unknown model" in err and "default_model" not in json.loads((user_home / "settings.json").read_text())


def test_import_by_name_installs_into_the_store_and_sets_the_default(run_cli, tmp_path, published, user_home):
    (tmp_path / CHECKPOINT).write_bytes(published[CHECKPOINT])
    code, out, err = run_cli("weights", "import", tmp_path / CHECKPOINT, "--name", "my-uniseg", "--device", "cpu")
    assert code == 0, err
    assert out.strip() == str(user_home / "models" / "my-uniseg") and "my-uniseg is now the default model" in err
    code, out, _ = run_cli("weights", "list", "--json")
    listed = {m["name"]: m for m in json.loads(out)}
    assert listed["my-uniseg"]["default"] and listed["my-uniseg"]["source"] == f"imported:{CHECKPOINT}"
    code, out, err = run_cli("weights", "verify", "my-uniseg")
    assert code == 0 and "model.safetensors  OK (as installed)" in out
    code, _, err = run_cli("weights", "import", tmp_path / CHECKPOINT, "--name", "my-uniseg", "--device", "cpu")
    assert code == 1 and "already installed" in err
    code, _, err = run_cli("weights", "import", tmp_path / CHECKPOINT, "--name", "a/b")
    assert code == 2 and "model name 'a/b'" in err
    code, _, err = run_cli("weights", "import", tmp_path / CHECKPOINT)
    assert code == 2 and "give exactly one of --output/-o (a folder) or --name" in err


def test_google_drive_is_one_thin_call_to_gdown(monkeypatch, tmp_path):
    # The Drive request itself cannot run here (no internet); what reaches gdown is checked.
    import gdown

    from uniseg_cli.weights.download import fetch

    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        Path(kwargs["output"]).write_bytes(b"weights")
        return kwargs["output"]

    monkeypatch.setattr(gdown, "download", fake_download)
    dest = fetch(tmp_path / CHECKPOINT, gdrive_id="1Ldgd5Ebc8VQrvGIpIgzUG2PTSDPUpEQJ", progress=False)
    assert dest.read_bytes() == b"weights"
    assert calls[0]["id"] == "1Ldgd5Ebc8VQrvGIpIgzUG2PTSDPUpEQJ" and "url" not in calls[0]
    assert calls[0]["resume"] and calls[0]["use_cookies"] and calls[0]["output"] == str(dest)


def test_the_shipped_release_pins_the_published_layout():
    entry = hub.load_registry().models[NAME]
    assert entry.release.architecture == UniSegConfig().to_dict()["architecture"]
    with torch.device("meta"):
        published = UniSeg(UniSegConfig())
    keys = [line.split("\t")[0] for line in (DATA / "uniseg_state_dict_keys.tsv").read_text().splitlines()[1:] if line]
    assert list(published.state_dict()) == keys and entry.release.tensors == len(keys) == 115
    assert entry.release.parameters == sum(p.numel() for p in published.parameters()) == 32_114_381
    assert [(f.name, f.role, f.gdrive_id) for f in entry.release.files] == [
        (CHECKPOINT, "checkpoint", "1Ldgd5Ebc8VQrvGIpIgzUG2PTSDPUpEQJ"),
        (PLANS, "plans", "1BtqdTSxGoSF4hXc3JUaSZG9uwiEo-SxR"),
        ("plans.pkl", "training-plans", "1ybtxtH13z4wqCQSRpD1JEKLMx6mH9xBV")]
    assert entry.license_text.startswith("UniSeg for non-commercial purposes\n")


def test_a_missing_file_on_the_mirror_is_one_line(run_cli, mirror, user_home):
    del mirror.files[PLANS]
    code, out, err = run_cli("weights", "download", NAME, "--accept-license", "--device", "cpu")
    assert code == 1 and out == ""
    assert _last(err) == f"Error: {PLANS}: {mirror.url}/{PLANS} answered HTTP 404 Not Found: the file is not there"
    assert _stored(user_home) == []


def test_a_hub_copy_takes_precedence_over_the_release(run_cli, hub_server, registry, mirror, small_model_dir, user_home):
    # One entry, one download command: once the registry names a Hub copy, that is what users get.
    from test_hub import REPO

    first = hub_server.commits[0]
    pins = {f: hub.sha256_of(small_model_dir / f) for f in ("config.json", "model.safetensors")}
    registry.models[NAME] = dataclasses.replace(registry.models[NAME], repo=REPO, revision=first, files=pins)
    code, _, err = run_cli("predict", CT, "--task", "kidney", "-m", NAME, "-o", user_home / "k.nii.gz")
    assert code == 2 and "its licence (UniSeg licence: non-commercial use only" in err   # the same licence gate
    code, out, err = run_cli("weights", "download", NAME, "--accept-license")
    assert code == 0, err
    assert out.strip().endswith(first) and mirror.requests == [] and _stored(user_home) == []
    assert f"{NAME} is now the default model" in err
    code, out, err = run_cli("weights", "verify")
    assert code == 0 and f"OK (pinned in the registry as {NAME})" in out


@pytest.mark.parametrize("change,message", [
    (lambda r: r["files"].pop(PLANS), "need one checkpoint and one plans file"),
    (lambda r: r["files"][CHECKPOINT].update(sha256="abc"), "sha256 must be 64 hex digits or null"),
    (lambda r: r["architecture"].update(num_classes="four"), "release architecture"),
    (lambda r: r.pop("parameters"), "release needs exactly the keys"),
])
def test_malformed_release_entries_are_refused(change, message):
    data = json.loads((hub.registry_folder() / "registry.json").read_text())
    change(data["models"][NAME]["release"])
    with pytest.raises(hub.RegistryError, match=message):
        hub.parse_registry(data)
