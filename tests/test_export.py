"""`uniseg export`: each format is written, reloaded the way a deployment would, and matches PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny model with one 1-channel and one 4-channel task (two graphs per export)."""
    import dataclasses

    from uniseg_cli import save_model
    from uniseg_cli.config import small_config
    from uniseg_cli.model.network import UniSeg
    from uniseg_cli.tasks import resolve_task

    tasks = tuple(dataclasses.replace(resolve_task(k), id=i) for i, k in enumerate(("kidney", "brain_tumor")))
    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("export") / "tiny"
    save_model(UniSeg(small_config(tasks=tasks, input_channels=(1, 4))).eval(), folder)
    return folder


def _reference(model_dir, channels: int, task: int) -> tuple[np.ndarray, np.ndarray]:
    from uniseg_cli import load_model

    model = load_model(model_dir)
    x = torch.randn(2, channels, *model.config.patch_size, generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        return x.numpy(), model(x, task).numpy()


def test_safetensors_export_is_a_model_folder(run_cli, tiny_model_dir, tmp_path):
    from uniseg_cli import load_model
    from uniseg_cli.model.files import read_safetensors

    out = tmp_path / "fp16"
    code, stdout, err = run_cli("export", tiny_model_dir, "--format", "safetensors", "--half", "-o", out, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert sorted(report["files"]) == ["README.md", "config.json", "model.safetensors"]
    assert 0 < max(report["max_abs_diff"].values()) <= 5e-2            # float16 weights: small, not zero
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())
    assert (out / "model.safetensors").stat().st_size < (tiny_model_dir / "model.safetensors").stat().st_size * 0.6
    x, expected = _reference(tiny_model_dir, 1, 0)
    with torch.inference_mode():
        got = load_model(out)(torch.from_numpy(x), 0).numpy()
    assert np.abs(got - expected).max() <= 5e-2
    assert set(read_safetensors(out / "model.safetensors")) == set(read_safetensors(tiny_model_dir / "model.safetensors"))
    assert "kidney" in (out / "README.md").read_text()


def test_torchscript_runs_without_uniseg(run_cli, tiny_model_dir, tmp_path):
    out = tmp_path / "ts"
    code, _, err = run_cli("export", tiny_model_dir, "--format", "torchscript", "-o", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [".uniseg-written.json", "config.json", "uniseg_1ch.pt",
                                                   "uniseg_4ch.pt"]
    for channels, task in ((1, 0), (4, 1)):
        x, expected = _reference(tiny_model_dir, channels, task)
        np.save(tmp_path / "x.npy", x)
        script = (
            "import sys; sys.modules['uniseg_cli'] = None\n"        # importing uniseg would fail
            "import numpy as np, torch\n"
            f"m = torch.jit.load({str(out / f'uniseg_{channels}ch.pt')!r})\n"
            f"y = m(torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r})), torch.tensor([{task}]))\n"
            f"np.save({str(tmp_path / 'y.npy')!r}, y.detach().numpy())\n")
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert np.abs(np.load(tmp_path / "y.npy") - expected).max() <= 1e-3


def test_onnx_inputs_outputs_and_parity(run_cli, tiny_model_dir, tmp_path):
    onnx = pytest.importorskip("onnx", reason="the export extra is not installed (pip install '.[export]')")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install '.[export]')")
    out = tmp_path / "onnx"
    code, stdout, err = run_cli("export", tiny_model_dir, "--format", "onnx", "-o", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["unchecked"] == []
    model = onnx.load(str(out / "uniseg_4ch.onnx"))
    assert model.opset_import[0].version >= 17
    inputs = {i.name: i for i in model.graph.input}
    assert set(inputs) == {"image", "task"} and [o.name for o in model.graph.output] == ["logits"]
    dims = inputs["image"].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [4, 32, 64, 64]   # dynamic batch
    assert inputs["task"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    session = ort.InferenceSession(str(out / "uniseg_4ch.onnx"), providers=["CPUExecutionProvider"])
    x, expected = _reference(tiny_model_dir, 4, 1)                         # batch 2 ≠ the export's example
    got = session.run(["logits"], {"image": x, "task": np.array([1], dtype=np.int64)})[0]
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-3


def test_onnx_with_a_fixed_task_takes_only_the_image(run_cli, tiny_model_dir, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install '.[export]')")
    import onnxruntime as ort

    out = tmp_path / "kidney"
    code, _, err = run_cli("export", tiny_model_dir, "--format", "onnx", "--task", "kidney", "-o", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [".uniseg-written.json", "config.json", "uniseg_1ch.onnx"]
    session = ort.InferenceSession(str(out / "uniseg_1ch.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    x, expected = _reference(tiny_model_dir, 1, 0)
    assert np.abs(session.run(["logits"], {"image": x})[0] - expected).max() <= 1e-3


def test_export_errors(run_cli, tiny_model_dir, tmp_path):
    code, _, err = run_cli("export", tiny_model_dir, "--format", "tflite")
    assert code == 2 and "--format must be one of safetensors, torchscript, onnx" in err
    code, _, err = run_cli("export", tiny_model_dir, "--format", "safetensors", "-o", tiny_model_dir)
    assert code == 2 and "is the source model folder" in err
    code, _, err = run_cli("export", tiny_model_dir, "--format", "onnx", "--channels", "2")
    assert code == 2 and "the model takes 1, 4" in err
    code, _, err = run_cli("export", tiny_model_dir, "--format", "torchscript", "--half")
    assert code == 2 and "--half applies to --format safetensors only" in err


def test_a_failed_check_writes_nothing(tiny_model_dir, tmp_path, monkeypatch):
    from uniseg_cli.model import exporters as export_module

    monkeypatch.setitem(export_module.TOLERANCE, "float16", 1e-9)
    with pytest.raises(export_module.ExportError, match=r"differs from PyTorch by .* \(tolerance 1e-09\); nothing was written"):
        export_module.export_model(str(tiny_model_dir), "safetensors", tmp_path / "out", half=True)
    assert not list(tmp_path.iterdir())


def test_force_never_replaces_a_folder_holding_the_source_model(run_cli, tiny_model_dir, tmp_path):
    """`export parent/model -o parent --force` replaced parent, deleting the model it exported."""
    import shutil

    parent = tmp_path / "models"
    shutil.copytree(tiny_model_dir, parent / "tiny")
    code, _, err = run_cli("export", parent / "tiny", "--format", "safetensors", "-o", parent, "--force")
    assert code == 2 and err.strip() == (f"Error: {parent}: holds the input {parent / 'tiny'}; write the output "
                                         "folder elsewhere")
    assert sorted(p.name for p in (parent / "tiny").iterdir()) == sorted(p.name for p in tiny_model_dir.iterdir())


def test_force_replaces_only_an_earlier_export_never_a_users_files(run_cli, tiny_model_dir, tmp_path, monkeypatch):
    """`export MODEL -o DIR --force` deleted everything in DIR; with `-o .` it emptied the working folder."""
    work = tmp_path / "work"
    (work / "notes").mkdir(parents=True)
    (work / "scan.nii.gz").write_bytes(b"a user's scan")
    (work / "notes" / "todo.txt").write_text("keep")
    monkeypatch.chdir(work)
    code, _, err = run_cli("export", tiny_model_dir, "--format", "torchscript", "-o", ".", "--force")
    assert code == 1 and err.strip() == (f"Error: {work}: holds notes and 1 other(s), which uniseg did not write "
                                         "there; give a new or empty folder (--force replaces only a folder uniseg "
                                         "wrote)")
    assert (work / "scan.nii.gz").read_bytes() == b"a user's scan" and (work / "notes" / "todo.txt").exists()
    assert sorted(p.name for p in work.iterdir()) == ["notes", "scan.nii.gz"]

    out = tmp_path / "export"
    assert run_cli("export", tiny_model_dir, "--format", "torchscript", "-o", out)[0] == 0
    written = sorted(p.name for p in out.iterdir())
    code, _, err = run_cli("export", tiny_model_dir, "--format", "torchscript", "-o", out)
    assert code == 1 and "holds an earlier output of uniseg (use --force to replace it)" in err
    assert run_cli("export", tiny_model_dir, "--format", "torchscript", "-o", out, "--force")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == written
    (out / "mine.txt").write_text("added by the user")
    code, _, err = run_cli("export", tiny_model_dir, "--format", "torchscript", "-o", out, "--force")
    assert code == 1 and "holds mine.txt, which uniseg did not write there" in err
    assert (out / "mine.txt").read_text() == "added by the user"


def test_onnx_export_prints_no_warnings_of_torchs_exporter(tiny_model_dir, tmp_path):
    """torch's exporter wrote four torchvision lines per graph to the terminal, past our logging."""
    pytest.importorskip("onnxscript", reason="the export extra is not installed (pip install '.[export]')")
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "uniseg_cli", "export", str(tiny_model_dir), "--format", "onnx",
                             "--task", "kidney", "-o", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "torchvision" not in result.stderr and result.stderr.count("\n") <= 3, result.stderr
