"""Each fault says what is wrong with which file, in one line, without a traceback: broken image files,
a task the model lacks, a checkpoint folder, a full disk or closed pipe on stdout, oblique previews,
piped tables."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import CT


def _last(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and "Traceback" not in err, err
    return lines[-1]


def _huge_header(path, gzipped):
    image = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    image.header.set_data_shape((30000, 30000, 30000))
    data = image.header.binaryblock + b"\0" * 132
    path.write_bytes(gzip.compress(data) if gzipped else data)


def _broken_files(folder):
    rgb = np.zeros((10, 10, 10), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), folder / "rgb.nii.gz")
    _huge_header(folder / "huge.nii", gzipped=False)
    _huge_header(folder / "huge.nii.gz", gzipped=True)
    volume = sitk.GetImageFromArray(np.zeros((5, 6, 7), np.int16))
    sitk.WriteImage(volume, str(folder / "noraw.mhd"))
    (folder / "noraw.raw").unlink()
    sitk.WriteImage(volume, str(folder / "cut.mha"))
    whole = (folder / "cut.mha").read_bytes()
    (folder / "cut.mha").write_bytes(whole[: len(whole) - 300])
    (folder / "bad.nrrd").write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 5 6\nencoding: raw\n\n")


@pytest.mark.parametrize("name, message", [
    ("rgb.nii.gz", "holds RGB colour voxels ([('R', 'u1'), ('G', 'u1'), ('B', 'u1')]); uniseg segments grey-value scans"),
    ("huge.nii", "its header claims 30000×30000×30000 voxels (108 TB) but the file holds"),
    ("huge.nii.gz", "its header claims 30000×30000×30000 voxels (108 TB) but its "),
    ("noraw.mhd", "its voxel data file noraw.raw (ElementDataFile) is missing"),
    ("cut.mha", "its header claims 7×6×5 voxels (420 bytes) but the file holds 120 bytes of voxel data"),
    ("bad.nrrd", "cannot read the image (parsed 2 values, but dimension is 3)"),
])
def test_broken_image_files_say_what_is_wrong(run_cli, coarse_model_dir, tmp_path, name, message):
    _broken_files(tmp_path)
    code, _, err = run_cli("predict", tmp_path / name, "-t", "liver", "-m", coarse_model_dir, "-o", tmp_path / "o")
    assert code == 1, err
    assert _last(err).startswith(f"Error: {tmp_path / name}: {message}"), err
    assert name != "huge.nii.gz" or "of compressed data cannot hold them" in _last(err)
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_a_published_task_the_model_lacks_is_named_as_such(run_cli, tmp_path):
    code, _, err = run_cli("predict", CT, "-t", "pancreas", "-m", "uniseg-demo", "-o", tmp_path)
    assert code == 2 and _last(err) == ("Error: task 'pancreas' (pancreas and tumour) is not one of this model's "
                                        "tasks (liver, kidney, spleen, brain_tumor); the published model "
                                        "uniseg-11task has it")
    code, _, err = run_cli("predict", CT, "-t", "pancras", "-m", "uniseg-demo", "-o", tmp_path)
    assert code == 2 and "unknown task 'pancras'" in err


def test_weights_import_of_a_folder_or_nothing(run_cli, tmp_path):
    code, _, err = run_cli("weights", "import", tmp_path, "-o", tmp_path / "m")
    assert code == 1 and _last(err) == (f"Error: {tmp_path}: is a folder; give the checkpoint file itself (nnU-Net "
                                        "v1: model_final_checkpoint.model, beside its .model.pkl)")
    code, _, err = run_cli("weights", "import", tmp_path / "none.model", "-o", tmp_path / "m")
    assert code == 1 and _last(err) == f"Error: {tmp_path / 'none.model'}: no such file"


def _uniseg(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "uniseg_cli", *map(str, args)], text=True, **kwargs)


def test_a_full_disk_on_stdout_is_one_line(tmp_path):
    if not __import__("os").path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    with open("/dev/full", "w") as full:
        result = _uniseg("tasks", "--json", stdout=full, stderr=subprocess.PIPE)
    assert result.returncode == 1 and result.stderr.strip() == "Error: cannot write standard output (No space left on device)"


def test_a_reader_that_stops_early_stops_the_batch_with_one_line(coarse_model_dir, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in "abc":
        shutil.copy(CT, scans / f"{name}.nii.gz")
    process = subprocess.Popen([sys.executable, "-m", "uniseg_cli", "-q", "predict", str(scans), "-t", "spleen", "-m",
                                str(coarse_model_dir), "-o", str(tmp_path / "out"), "--no-tta", "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()                       # `| head -1`: one record, then the reader is gone
    process.stdout.close()
    _, err = process.communicate(timeout=300)
    assert '"case": "a"' in first
    assert process.returncode == 141, err
    assert err.strip() == "Error: standard output was closed by its reader (head, a pager); stopped there"


def test_piped_tables_are_not_cut_to_80_columns():
    result = _uniseg("tasks", capture_output=True)
    assert result.returncode == 0
    assert "brain_tumor" in result.stdout and "enhancing tumour" in result.stdout   # cut or wrapped at 80 before
    assert max(len(line) for line in result.stdout.splitlines()) > 80


def test_an_oblique_scan_previews(run_cli, coarse_model_dir, tmp_path):
    """Axes at 45° made two array axes pick the same world axis ("repeated axis in transpose")."""
    image = nib.load(CT)
    turn = np.eye(4)
    turn[:2, :2] = [[np.cos(np.pi / 4), -np.sin(np.pi / 4)], [np.sin(np.pi / 4), np.cos(np.pi / 4)]]
    scan = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), turn @ image.affine, image.header), scan)
    code, _, err = run_cli("predict", scan, "-t", "spleen", "-m", coarse_model_dir, "-o", tmp_path / "o", "--no-tta",
                           "--preview")
    assert code == 0, err
    preview = tmp_path / "o" / "oblique_spleen_preview.png"
    import matplotlib.image

    assert matplotlib.image.imread(preview).std() > 0.05      # an image, not a blank page
