"""`uniseg weights import`: nnU-Net v1 checkpoints become model folders, and pickled code never runs."""

from __future__ import annotations

import io
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from uniseg_cli import load_model
from uniseg_cli.config import small_config
from uniseg_cli.errors import CheckpointError
from uniseg_cli.model.checkpoint_import import infer_config, read_checkpoint, read_plans
from uniseg_cli.model.network import UniSeg


def nnunet_v1_checkpoint(model: UniSeg) -> dict:
    """What nnU-Net v1's ``save_checkpoint`` writes: weights, optimizer, curves with numpy scalars, AMP state."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    model.train()
    out = model(torch.randn(1, 1, *model.config.patch_size), 0)
    out[0].mean().backward()
    optimizer.step()
    model.eval()
    return {
        "epoch": 1000,
        "state_dict": OrderedDict((k, v.clone()) for k, v in model.state_dict().items()),
        "optimizer_state_dict": optimizer.state_dict(),
        "lr_scheduler_state_dict": None,
        "plot_stuff": ([np.float64(0.5), np.float64(0.4)], [np.float64(0.6)], [], [np.float64(0.8)]),
        "best_stuff": (999, np.float64(-0.7), np.float64(0.81), np.float64(0.8)),
        "amp_grad_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                            "growth_interval": 2000, "_growth_tracker": 7},
    }


def plans_file(path: Path, *, patch=(32, 64, 64), base=4) -> Path:
    """A ``.model.pkl`` as nnU-Net v1 writes it: init args, class name and plans with numpy arrays."""
    stage = {
        "batch_size": 2,
        "num_pool_per_axis": [4, 5, 5],
        "patch_size": np.array(patch),
        "current_spacing": np.array([3.0, 1.5, 1.5]),
        "pool_op_kernel_sizes": [[1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
        "conv_kernel_sizes": [[1, 3, 3]] + [[3, 3, 3]] * 5,
        "do_dummy_2D_data_aug": False,
    }
    data = {
        "init": ("plans.pkl", 0, "out", "data", True, 1, True, True, True),
        "name": "UniSegTrainer",
        "class": "<class 'UniSegTrainer'>",
        "plans": {"plans_per_stage": {0: dict(stage, patch_size=np.array([8, 8, 8])), 1: stage},
                  "base_num_features": base, "conv_per_stage": 2, "num_classes": 3,
                  "dataset_properties": {"intensityproperties": OrderedDict({0: {"mean": np.float32(1.5)}})}},
    }
    path.write_bytes(pickle.dumps(data, protocol=4))
    return path


@pytest.fixture
def checkpoint(tmp_path, small_model) -> Path:
    path = tmp_path / "model_final_checkpoint.model"
    torch.save(nnunet_v1_checkpoint(small_model), path)
    return path


def test_import_converts_and_the_folder_gives_identical_outputs(tmp_path, checkpoint, run_cli, ct_patch):
    plans = plans_file(tmp_path / "model_final_checkpoint.model.pkl")
    code, out, err = run_cli("weights", "import", checkpoint, "--plans", plans, "-o", tmp_path / "uniseg",
                             "--device", "cpu", "--license", "CC BY-NC-SA 4.0")
    assert code == 0, err
    assert out.strip() == str(tmp_path / "uniseg")
    assert "plans agree with the weights" in err and "max |diff| = 0" in err
    model = load_model(tmp_path / "uniseg")
    assert model.config == small_config(license="CC BY-NC-SA 4.0", source="converted from model_final_checkpoint.model")
    raw = UniSeg(model.config)
    raw.load_state_dict(torch.load(checkpoint, weights_only=False)["state_dict"])  # our own test file: trusted
    raw.eval()
    with torch.no_grad():
        for task in (0, 1, 6):
            assert torch.equal(model(ct_patch, task), raw(ct_patch, task))


def test_configuration_is_inferred_from_shapes(small_model):
    from uniseg_cli.config import UniSegConfig

    assert infer_config(small_model.state_dict()) == small_config()
    with torch.device("meta"):
        published = UniSeg(UniSegConfig())
    assert infer_config(published.state_dict()) == UniSegConfig()


def test_plans_that_disagree_are_reported(tmp_path, checkpoint, run_cli):
    plans = plans_file(tmp_path / "other.pkl", patch=(64, 192, 192), base=32)
    code, _, err = run_cli("weights", "import", checkpoint, "--plans", plans, "-o", tmp_path / "out", "--device", "cpu")
    assert code == 0
    assert "plans disagree with the weights" in err and "patch_size: plans (64, 192, 192), weights (32, 64, 64)" in err


def test_numpy_1_era_scalar_names_are_allowed(tmp_path, small_model):
    # Released checkpoints were pickled under numpy 1, which names scalars numpy.core.multiarray.scalar.
    buffer = io.BytesIO()
    torch.save(nnunet_v1_checkpoint(small_model), buffer, _use_new_zipfile_serialization=False)
    legacy = buffer.getvalue()
    assert b"numpy._core.multiarray\nscalar" in legacy
    path = tmp_path / "numpy1.model"
    path.write_bytes(legacy.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"))
    state = read_checkpoint(path)
    assert set(state) == set(small_model.state_dict())


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, small_model, run_cli):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.model"
    torch.save({"state_dict": small_model.state_dict(), "plot_stuff": _Exploit(marker)}, path)
    code, out, err = run_cli("weights", "import", path, "-o", tmp_path / "out", "--device", "cpu")
    assert code == 1 and out == ""
    assert err.strip().startswith(f"Error: {path}: refused (nothing in it was run): it asks for posix.system, which is "
                                  "not on uniseg's allow-list")
    assert len(err.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "out").exists()

    plans = tmp_path / "evil.pkl"
    plans.write_bytes(pickle.dumps({"plans": _Exploit(marker)}))
    with pytest.raises(CheckpointError, match=r"refused \(nothing in it was run\): it asks for posix.system"):
        read_plans(plans)
    assert not marker.exists()


def test_refusals_name_the_global_not_torchs_unsafe_advice(tmp_path, small_model):
    """A plain pickle of protocol 4 made torch name only an opcode, after advising weights_only=False."""
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.model"
    path.write_bytes(pickle.dumps({"state_dict": dict(small_model.state_dict()), "x": _Exploit(marker)}, protocol=4))
    with pytest.raises(CheckpointError) as refused:
        read_checkpoint(path)
    assert str(refused.value) == (f"{path}: refused (nothing in it was run): it asks for posix.system, which is not "
                                  "on uniseg's allow-list of plain data types")
    assert "weights_only" not in str(refused.value) and not marker.exists()


def test_empty_and_truncated_checkpoints_say_so(tmp_path, small_model):
    empty = tmp_path / "empty.model"
    empty.touch()
    with pytest.raises(CheckpointError, match=r"empty.model: is empty \(0 bytes; an interrupted download or copy\?\)$"):
        read_checkpoint(empty)                                                   # was "EOFError: EOFError"
    whole = tmp_path / "whole.model"
    torch.save({"state_dict": small_model.state_dict()}, whole)
    cut = tmp_path / "cut.model"
    cut.write_bytes(whole.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match=r"cut.model: not a readable PyTorch checkpoint \(a damaged zip archive: "
                                              r"truncated or corrupted\)$"):
        read_checkpoint(cut)


def test_ddp_prefixes_are_stripped_and_bare_state_dicts_accepted(tmp_path, small_model):
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in small_model.state_dict().items()}, path)
    assert set(read_checkpoint(path)) == set(small_model.state_dict())


def test_files_that_are_not_checkpoints(tmp_path, run_cli):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    code, _, err = run_cli("weights", "import", text, "-o", tmp_path / "out")
    assert code == 1 and err.startswith(f"Error: {text}: not a readable PyTorch checkpoint")
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, other)
    code, _, err = run_cli("weights", "import", other, "-o", tmp_path / "out")
    assert code == 1 and "not a UniSeg checkpoint" in err
    code, _, err = run_cli("weights", "import", tmp_path / "absent.model", "-o", tmp_path / "out")
    assert code == 1 and "no such file" in err
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept_unless_forced(tmp_path, checkpoint, run_cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for force in ((), ("--force",)):       # --force never deletes a file uniseg did not write
        code, _, err = run_cli("weights", "import", checkpoint, "-o", out, "--device", "cpu", *force)
        assert code == 1 and "holds keep.txt, which uniseg did not write there" in err
        assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert run_cli("weights", "import", checkpoint, "-o", out, "--device", "cpu")[0] == 0
    code, _, err = run_cli("weights", "import", checkpoint, "-o", out, "--device", "cpu")
    assert code == 1 and "holds an earlier output of uniseg (use --force to replace it)" in err
    code, _, _ = run_cli("weights", "import", checkpoint, "-o", out, "--device", "cpu", "--force")
    assert code == 0 and sorted(p.name for p in out.iterdir()) == [".uniseg-written.json", "config.json",
                                                                   "model.safetensors"]


def test_an_output_folder_holding_the_checkpoint_is_refused(tmp_path, checkpoint, run_cli, monkeypatch):
    # --force would replace the folder, and the checkpoint in it with it
    code, _, err = run_cli("weights", "import", checkpoint, "-o", tmp_path, "--device", "cpu", "--force")
    assert code == 2 and err.strip() == f"Error: {tmp_path}: holds the input {checkpoint}; write the output folder elsewhere"
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("weights", "import", checkpoint.name, "-o", ".", "--force")
    assert code == 2 and "holds the input" in err and "Traceback" not in err
    assert checkpoint.exists()
