"""The output plan on real scans: every file a case writes is checked before any work, a rerun never
takes its own outputs for scans, ``--skip-existing`` trusts only complete cases, a failed re-publish
keeps the earlier outputs whole, statistics tables keep every row, and JSON stays JSON."""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import CT


def _strict_json(text: str) -> dict:
    """json.loads that refuses NaN and Infinity, as every reader but Python's does."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def scan(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(CT, folder / "scan.nii.gz")
    return folder / "scan.nii.gz"


def test_a_second_format_cannot_overwrite_the_input(run_cli, coarse_model_dir, scan):
    before = scan.read_bytes()
    code, _, err = run_cli("predict", scan, "-t", "kidney", "-m", coarse_model_dir, "-f", "seg-nrrd,nifti",
                           "-o", scan.with_name("scan.seg.nrrd"))
    assert code == 2, err
    assert f"{scan}: the nifti label map of case 'scan' would overwrite the input {scan}" in err
    assert scan.read_bytes() == before and _listing(scan.parent) == ["scan.nii.gz"]


def test_two_formats_with_one_name_are_refused_before_any_work(run_cli, coarse_model_dir, scan, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli("predict", scan, "-t", "kidney", "-m", coarse_model_dir, "-f", "seg-nrrd,nifti",
                           "--preview-file", out / "scan.seg.nrrd", "-o", out / "scan.seg.nrrd")
    assert code == 2 and "must end in .png" in err
    code, _, err = run_cli("predict", scan, "-t", "kidney", "-m", coarse_model_dir, "-o", out / "k.nii.gz",
                           "--statistics-csv", out / "k.json")
    assert code == 2 and f"{out / 'k.json'}: is planned twice, as the record of case 'scan' and as the " \
                         "--statistics-csv table" in err
    assert not out.exists()


def test_two_dicom_formats_with_one_name_are_refused(run_cli, coarse_model_dir, tmp_path):
    pytest.importorskip("highdicom", reason="the dicom extra")
    pytest.importorskip("rt_utils", reason="the dicom extra")
    from conftest import DICOM

    code, _, err = run_cli("predict", DICOM, "-t", "liver", "-m", coarse_model_dir, "-f", "rtstruct,dicom-seg",
                           "-o", tmp_path / "plan.dcm")
    assert code == 2 and (f"{tmp_path / 'plan.dcm'}: is planned twice, as the rtstruct label map of case "
                          "'example_ct_dicom' and as the dicom-seg label map") in err
    assert _listing(tmp_path) == []


def test_a_rerun_into_the_scans_folder_does_not_segment_its_own_outputs(run_cli, coarse_model_dir, scan):
    folder = scan.parent
    for _ in range(2):
        code, stdout, err = run_cli("predict", folder, "-t", "spleen", "-m", coarse_model_dir, "-o", folder,
                                    "--no-tta", "--json", "--save-probabilities", "nifti")
        assert code == 0, err
        assert [r["case"] for r in map(json.loads, stdout.splitlines())] == ["scan"]
    assert _listing(folder) == ["scan.nii.gz", "scan_spleen.json", "scan_spleen.nii.gz",
                                "scan_spleen_probabilities.nii.gz"]
    assert "skipping 2 file(s) uniseg wrote, not scans: scan_spleen.nii.gz (listed in scan_spleen.json)" in err
    # without the record, the header still says who wrote the label map
    (folder / "scan_spleen.json").unlink()
    code, stdout, err = run_cli("predict", folder, "-t", "spleen", "-m", coarse_model_dir, "-o", folder / "again",
                                "--no-tta", "--json")
    assert code == 0 and [json.loads(line)["case"] for line in stdout.splitlines()] == ["scan"]
    assert "scan_spleen.nii.gz (its header says uniseg wrote it)" in err


@pytest.mark.parametrize("damage", ["empty", "truncated", "replaced", "no record"])
def test_skip_existing_redoes_a_case_whose_outputs_are_not_complete(run_cli, coarse_model_dir, scan, tmp_path,
                                                                     damage):
    out = tmp_path / "out"
    args = ("predict", scan, "-t", "spleen", "-m", coarse_model_dir, "-o", out, "--no-tta", "--json",
            "--skip-existing")
    code, stdout, err = run_cli(*args)
    assert code == 0 and "skipped" not in _strict_json(stdout), err
    label_map = out / "scan_spleen.nii.gz"
    good = label_map.read_bytes()
    record = _strict_json((out / "scan_spleen.json").read_text())
    assert record["files"]["scan_spleen.nii.gz"]["bytes"] == len(good)
    assert record["result"]["labels"][0]["name"] == "spleen"
    code, stdout, _ = run_cli(*args)
    assert code == 0 and _strict_json(stdout)["skipped"] is True          # complete: skipped
    if damage == "empty":
        label_map.write_bytes(b"")
    elif damage == "truncated":
        label_map.write_bytes(good[: len(good) // 2])
    elif damage == "replaced":
        label_map.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))          # same size, other content
    else:
        (out / "scan_spleen.json").unlink()
    code, stdout, err = run_cli(*args)
    assert code == 0 and "skipped" not in _strict_json(stdout), err       # redone
    assert label_map.read_bytes() == good


def test_a_failed_republish_keeps_the_earlier_outputs_whole(run_cli, coarse_model_dir, scan, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ("predict", scan, "-t", "spleen", "-m", coarse_model_dir, "-o", out, "--no-tta", "--preview")
    assert run_cli(*args)[0] == 0
    before = {name: (out / name).read_bytes() for name in _listing(out)}
    from uniseg_cli.io import atomic

    real = atomic.publish

    def full_disk_on_the_record(tmp, dest, *, folder=False):
        if dest.name == "scan_spleen.json":          # published last, after the map and the preview
            raise OSError(28, "No space left on device")
        real(tmp, dest, folder=folder)

    monkeypatch.setattr(atomic, "publish", full_disk_on_the_record)
    code, _, err = run_cli(*args, "--step", "0.9")
    assert code == 1 and "scan_spleen.json: cannot write (No space left on device)" in err
    assert {name: (out / name).read_bytes() for name in _listing(out)} == before
    monkeypatch.undo()
    code, stdout, _ = run_cli(*args, "--skip-existing", "--json")
    assert code == 0 and _strict_json(stdout)["skipped"] is True


def _rows(path):
    with open(path, newline="") as handle:
        return [(r["case"], r["name"]) for r in csv.DictReader(handle)]


def test_statistics_rows_survive_a_resumed_and_a_sharded_run(run_cli, coarse_model_dir, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(CT, scans / f"{name}.nii.gz")
    out, table = tmp_path / "out", tmp_path / "stats.csv"
    base = ("predict", "-t", "spleen", "-m", coarse_model_dir, "-o", out, "--no-tta", "--statistics-csv", table)
    assert run_cli(*base, scans / "a.nii.gz")[0] == 0
    assert _rows(table) == [("a", "spleen")]
    code, _, err = run_cli(*base, scans, "--skip-existing")                 # resumed: a skipped, b and c run
    assert code == 0, err
    assert _rows(table) == [("a", "spleen"), ("b", "spleen"), ("c", "spleen")]
    sharded, shard_table = tmp_path / "sharded", tmp_path / "sharded.csv"
    for index in range(3):                                                  # three jobs, one table
        code, _, err = run_cli("predict", scans, "-t", "spleen", "-m", coarse_model_dir, "-o", sharded, "--no-tta",
                               "--statistics-csv", shard_table, "--shard", f"{index}/3")
        assert code == 0, err
    assert _rows(shard_table) == _rows(table)


def test_an_infinite_voxel_gives_valid_json_and_is_reported(run_cli, coarse_model_dir, tmp_path):
    image = nib.load(CT)
    data = np.asarray(image.dataobj, dtype=np.float32)
    data[tuple(s // 2 for s in data.shape)] = np.inf
    data[0, 0, 0] = -np.inf
    scan = tmp_path / "inf.nii.gz"
    header = image.header.copy()
    header.set_data_dtype(np.float32)
    header.set_slope_inter(1.0, 0.0)
    nib.save(nib.Nifti1Image(data, image.affine, header), scan)
    code, stdout, err = run_cli("predict", scan, "-t", "spleen,liver", "-m", coarse_model_dir, "-o", tmp_path / "o",
                                "--no-tta", "--json", "--statistics")
    assert code == 0, err
    record = _strict_json(stdout)
    assert "of the voxels are infinite; they are read as 0" in err
    for label in record["labels"]:
        if label["voxels"]:
            assert all(np.isfinite(label["statistics"][k]) for k in ("mean", "std", "min", "max"))
        else:
            assert label["statistics"] is None and label["statistics_reason"] == "the label is empty"


def test_dumps_writes_null_for_what_json_cannot_hold():
    from uniseg_cli.outputs.record import dumps

    assert _strict_json(dumps({"mean": float("inf"), "std": [float("nan"), 1.5]})) == {"mean": None,
                                                                                       "std": [None, 1.5]}


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_every_label_map_format_carries_the_mark_that_it_is_an_output(tmp_path, ending):
    """A label map of a DICOM input goes through ITK, whose NIfTI writer drops metadata: the mark is
    written into the header's descrip itself; the geometry stays exact."""
    import SimpleITK as sitk
    from conftest import DICOM

    from uniseg_cli.io.images import image_description, read_image, write_image_file

    data, geometry = read_image(DICOM)
    path = tmp_path / f"map{ending}"
    write_image_file(path, (data[0] > 0).astype(np.uint8), geometry, description="uniseg output")
    assert image_description(path) == "uniseg output"
    image = sitk.ReadImage(str(path))
    assert image.GetOrigin() == pytest.approx(geometry.origin) and image.GetSpacing() == pytest.approx(
        geometry.spacing[::-1])
    assert np.array_equal(sitk.GetArrayFromImage(image), (data[0] > 0).astype(np.uint8))
