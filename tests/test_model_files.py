"""Model folders (config.json + model.safetensors): the one way weights are saved and loaded."""

from __future__ import annotations

import json

import pytest
import torch

from uniseg_cli import load_model, save_model
from uniseg_cli.config import small_config
from uniseg_cli.errors import ModelFileError, UnisegError
from uniseg_cli.model.network import UniSeg


def test_saved_folder_loads_in_eval_mode_with_identical_outputs(tmp_path, small_model, ct_patch):
    folder = save_model(small_model, tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == [".uniseg-written.json", "config.json", "model.safetensors"]
    loaded = load_model(folder)
    assert not loaded.training and loaded.config == small_model.config
    with torch.no_grad():
        assert torch.equal(loaded(ct_patch, 1), small_model(ct_patch, 1))
    # The weights file alone (beside its config.json) names the same model.
    assert torch.equal(load_model(folder / "model.safetensors").intermedia_prompt, small_model.intermedia_prompt)


def test_loading_a_model_does_not_import_the_compiler_stack(tmp_path, small_model):
    """Loading builds the network on the meta device; drawing random initial weights there imported
    torch's compiler stack (about 1 s of every ``uniseg predict``)."""
    import subprocess
    import sys

    folder = save_model(small_model, tmp_path / "model")
    code = ("import sys; from uniseg_cli import load_model; load_model(sys.argv[1]); "
            "print(sorted(m for m in ('torch._dynamo', 'torch.fx.experimental.symbolic_shapes') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_weights_that_do_not_match_the_config_are_refused(tmp_path, small_model):
    folder = save_model(small_model, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["architecture"]["base_features"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=r"model.safetensors: does not match its configuration: 59 tensor\(s\) "
                                             r"with another shape \(conv_blocks_localization.2.0.blocks.0.conv.weight: "
                                             r"file \(16, 32, 3, 3, 3\), config \(32, 64, 3, 3, 3\)"):
        load_model(folder)


def test_missing_and_extra_tensors_are_named(tmp_path):
    from safetensors.torch import save_file

    model = UniSeg(small_config())
    folder = save_model(model, tmp_path / "model")
    state = {k: v for k, v in model.state_dict().items() if k != "tu.0.weight"}
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ModelFileError, match=r"1 tensor\(s\) missing \(tu.0.weight\), 1 tensor\(s\) unexpected \(extra.weight\)"):
        load_model(folder)


def test_unusable_folders_are_errors_naming_the_path(tmp_path, small_model):
    with pytest.raises(ModelFileError, match="no such model folder"):
        load_model(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="not a model folder .config.json is missing"):
        load_model(tmp_path / "empty")
    folder = save_model(small_model, tmp_path / "model")
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelFileError, match="model.safetensors: not a readable safetensors file"):
        load_model(folder)
    (folder / "config.json").write_text("[]")
    with pytest.raises(ModelFileError, match="config.json: config: expected an object"):
        load_model(folder)


def test_saving_never_clobbers_or_leaves_partial_folders(tmp_path, small_model):
    folder = save_model(small_model, tmp_path / "model")
    with pytest.raises(UnisegError, match="holds an earlier output of uniseg"):
        save_model(small_model, folder)
    torch.manual_seed(1)
    other = UniSeg(small_config())
    save_model(other, folder, overwrite=True)
    assert torch.equal(load_model(folder).intermedia_prompt, other.intermedia_prompt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
