"""DICOM series as real scanners and PACS deliver them: character sets, sub-millimetre slices written to
two decimals, our own SEG/RTSTRUCT beside the slices, an odd slice, mixed modalities, gaps (RTSTRUCT
contours then still on their slices), anonymised UIDs refused before inference.

The GE series (tests/data/ct_dicom_3slice, 3 axial slices from dcmqi, BSD-3) has an empty Specific
Character Set, as many scanners write; the others are variants of the shipped 20-slice series written
with pydicom.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from conftest import DATA, DICOM

pydicom = pytest.importorskip("pydicom", reason="the dicom extra: pip install '.[dicom]'")
GE = DATA / "ct_dicom_3slice"


def _with_uids(source, folder, edit=None):
    """A copy of ``source`` with the UIDs its anonymiser blanked filled in; ``edit(index, ds)`` may change
    each slice (return False to leave it out)."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    study, series = generate_uid(entropy_srcs=[str(folder), "study"]), generate_uid(entropy_srcs=[str(folder), "s"])
    for index, path in enumerate(sorted(source.iterdir())):
        ds = pydicom.dcmread(path)
        if not str(ds.get("SOPInstanceUID", "")).strip():
            ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        if not str(ds.get("FrameOfReferenceUID", "")).strip():
            ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[str(folder), "for"])
        if edit is not None and edit(index, ds) is False:
            continue
        pydicom.dcmwrite(folder / path.name, ds, enforce_file_format=True)
    return folder


def _dciodvfy_errors(path):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian's dicom3tools) is not installed")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("charset, name", [("", "JANCT000"), ("ISO_IR 100", "Müller^Hans"),
                                           ("ISO_IR 192", "José^Núñez"), ("GB18030", "张^三")])
def test_dicom_outputs_of_a_real_ge_series_in_every_character_set(run_cli, tmp_path, charset, name):
    pytest.importorskip("highdicom")
    pytest.importorskip("rt_utils")

    def recode(index, ds):
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
    series = _with_uids(GE, tmp_path / "ge", recode)
    out = tmp_path / "out"
    code, stdout, err = run_cli("predict", series, "-t", "liver", "-m", "uniseg-demo", "--fast", "--device", "cpu",
                                "-f", "dicom-seg,rtstruct", "-o", out, "--json")
    assert code == 0, err
    record = json.loads(stdout)
    assert record["labels"][0]["voxels"] > 0                       # the demo model finds the liver on these slices
    for path in (record["output"], record["outputs"]["rtstruct"]):
        ds = pydicom.dcmread(path)
        assert str(ds.PatientName) == name
        if charset:
            assert ds.SpecificCharacterSet == charset
        assert _dciodvfy_errors(path) == []


def test_a_sub_millimetre_series_with_positions_to_two_decimals_is_even(run_cli, coarse_model_dir, tmp_path):
    def spacing(index, ds):
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                                   round(-100 + 0.625 * index, 2)]
        ds.SliceThickness = 0.625
    series = _with_uids(DICOM, tmp_path / "thin", spacing)
    code, _, err = run_cli("predict", series, "-t", "liver", "-m", coarse_model_dir, "--no-tta", "-o", tmp_path / "o")
    assert code == 0, err
    # a slice really missing is still found
    missing = _with_uids(DICOM, tmp_path / "missing", lambda i, ds: False if i == 7 else spacing(i, ds))
    code, _, err = run_cli("predict", missing, "-t", "liver", "-m", coarse_model_dir, "--no-tta", "-o", tmp_path / "p")
    assert code == 1 and "1 slice(s) missing: 1.25 mm between slice positions" in err


def test_our_own_seg_and_rtstruct_beside_the_slices_are_ignored(run_cli, tmp_path):
    pytest.importorskip("highdicom")
    pytest.importorskip("rt_utils")
    series = _with_uids(GE, tmp_path / "ge")
    first = tmp_path / "first"
    args = ("-t", "liver", "-m", "uniseg-demo", "--fast", "--device", "cpu", "--json")
    assert run_cli("predict", series, *args, "-f", "dicom-seg,rtstruct", "-o", first)[0] == 0
    for path in first.glob("*.dcm"):
        shutil.copy(path, series / path.name)
    code, stdout, err = run_cli("predict", series, *args, "-o", tmp_path / "again")
    assert code == 0, err
    assert "ignoring 1 DICOM object(s) that are not image slices: SEG ge_liver.dcm" in err
    assert json.loads(stdout)["labels"][0]["voxels"] > 0


def test_one_slice_of_another_size_is_named(run_cli, coarse_model_dir, tmp_path):
    def shrink(index, ds):
        if index == 4:
            ds.set_pixel_data(np.ascontiguousarray(ds.pixel_array[:256, :256]), ds.PhotometricInterpretation,
                              int(ds.BitsStored))
    series = _with_uids(DICOM, tmp_path / "odd", shrink)
    code, _, err = run_cli("predict", series, "-t", "liver", "-m", coarse_model_dir, "--no-tta", "-o", tmp_path / "o")
    odd = sorted(DICOM.iterdir())[4].name
    assert code == 1 and f"{series / odd}: is 256×256 pixels, the other slices of the series {series} are 512×512" in err


def test_an_mr_slice_inside_a_ct_series_is_refused(run_cli, coarse_model_dir, tmp_path):
    def mr(index, ds):
        if index == 3:
            ds.Modality = "MR"
    series = _with_uids(DICOM, tmp_path / "mixed", mr)
    code, _, err = run_cli("predict", series, "-t", "liver", "-m", coarse_model_dir, "--no-tta", "-o", tmp_path / "o")
    assert code == 1 and "slices of different modalities in one series (19 CT, 1 MR slices" in err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_rtstruct_contours_lie_on_their_slices_when_a_gap_is_allowed(run_cli, tmp_path):
    pytest.importorskip("rt_utils")
    series = _with_uids(DICOM, tmp_path / "gap", lambda i, ds: False if i == 9 else None)
    out = tmp_path / "out"
    code, stdout, err = run_cli("predict", series, "-t", "liver", "-m", "uniseg-demo", "--fast", "--device", "cpu",
                                "--allow-gaps", "-f", "rtstruct,dicom-seg", "-o", out, "--json")
    assert code == 0 and "1 slice(s) missing" in err, err
    rtstruct = pydicom.dcmread(json.loads(stdout)["output"])
    slices = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p, stop_before_pixels=True)
                                                     for p in series.iterdir())}
    contours = [c for roi in rtstruct.ROIContourSequence for c in roi.ContourSequence]
    assert contours
    for contour in contours:
        source = slices[str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)]
        orientation = np.asarray(source.ImageOrientationPatient, dtype=float)
        normal = np.cross(orientation[:3], orientation[3:])
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        assert np.allclose(points @ normal, np.dot(np.asarray(source.ImagePositionPatient, dtype=float), normal),
                           atol=1e-3)


def test_blank_uids_are_refused_before_the_network_runs(run_cli, coarse_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("highdicom")
    from uniseg_cli.inference.predictor import Segmenter

    def never(*args, **kwargs):
        raise AssertionError("the network ran")

    monkeypatch.setattr(Segmenter, "run", never)
    code, _, err = run_cli("predict", DICOM, "-t", "liver", "-m", coarse_model_dir, "--no-tta", "-f", "dicom-seg",
                           "-o", tmp_path)
    assert code == 1 and "has no SOPClassUID, SOPInstanceUID" in err and "the network ran" not in err
