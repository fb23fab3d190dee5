"""The bundled demo model: registered, verified, and the README's quickstart works offline."""

from __future__ import annotations

import json

import numpy as np
from conftest import CT, DATA


def test_demo_model_is_bundled_and_verified():
    from uniseg_cli import load_model
    from uniseg_cli.weights.hub import load_registry, resolve_model

    entry = load_registry().models["uniseg-demo"]
    resolved = resolve_model("uniseg-demo")                     # re-hashes the bundled files
    assert resolved.entry == entry and (resolved.path / "README.md").read_text().startswith("# uniseg-demo")
    model = load_model(resolved.path)
    assert [t.key for t in model.config.tasks] == list(entry.tasks)
    assert "demonstration" in model.config.license


def test_quickstart_segments_the_example_ct_offline(run_cli, tmp_path, monkeypatch):
    """The bundled model, offline, as the README runs it: `uniseg predict … --task kidney -m uniseg-demo --fast`."""
    import nibabel as nib

    from uniseg_cli.devices import pick_device
    from uniseg_cli.inference.predictor import Segmenter
    from uniseg_cli.inference.sliding_window import WindowOptions
    from uniseg_cli.io.images import read_image

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "kidney.nii.gz"
    code, stdout, err = run_cli("predict", CT, "--task", "kidney", "-m", "uniseg-demo", "--fast", "-o", out, "--json")
    assert code == 0, err
    device = pick_device("auto")                                # what the command picks on this machine
    fast = Segmenter("uniseg-demo", device=device, window=WindowOptions(precision="fast")).window.precision_label
    assert f"on {device} ({fast}, TTA off, step 0.75)" in err
    record = json.loads(stdout)
    labels, geometry = read_image(out)
    assert geometry.same_grid(read_image(CT)[1])
    kidney = labels[0] == 1
    assert record["labels"][0]["name"] == "kidney" and record["labels"][0]["voxels"] == int(kidney.sum()) > 0
    reference = np.isin(np.asarray(nib.load(DATA / "example_seg_fast_force_split.nii.gz").dataobj).transpose(2, 1, 0), (2, 3))
    dice = 2 * (kidney & reference).sum() / (kidney.sum() + reference.sum())
    assert dice >= 0.85, dice                                   # it fits the CT it was trained on
