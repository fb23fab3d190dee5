"""Confidence, quality flags and post-processing (uniseg_cli.quality): the uncertainty maps against a
brute-force computation, volume ranges that bracket each label, each flag on a constructed case from
the real CT and its TotalSegmentator map, --fail-on, and --keep-largest / --min-component-ml."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import CT, DATA
from uniseg_cli.inference.sliding_window import WindowOptions, mirror_combinations, sliding_window
from uniseg_cli.labels import Head
from uniseg_cli.quality.flags import MapGeometry, parse_fail_on, structure_flags
from uniseg_cli.quality.postprocess import PostProcessing, Removed, clean_map

SEG = DATA / "example_seg_fast_force_split.nii.gz"   # TotalSegmentator: 1 spleen, 2/3 kidneys, 5 liver
AXIAL = (0, 1, 2)  # array axes of a nibabel (x, y, z) array: left-right, anterior-posterior, superior-inferior


def test_the_window_entropy_channel_is_the_flip_average_of_each_copys_entropy(small_model, ct_patch):
    model = small_model.eval()
    head = Head(1, 3)
    with torch.inference_mode():
        [out] = sliding_window(model, ct_patch[0], [head], WindowOptions(mirror=True, precision="fp32"),
                               flip_entropy=True)
        copies = []
        for axes in mirror_combinations(model.config.mirror_axes):
            flipped = torch.flip(ct_patch, axes) if axes else ct_patch
            p = torch.softmax(model(flipped, 1).float(), dim=1)[:, :3]
            copies.append((torch.flip(p, axes) if axes else p)[0])
    mean = torch.stack(copies).mean(0)

    def entropy(p):
        q = p / p.sum(0, keepdim=True)
        return -(q * q.clamp_min(1e-12).log()).sum(0) / math.log(3)

    expected = torch.stack([entropy(p) for p in copies]).mean(0)
    assert len(copies) == 8
    assert torch.allclose(out[:3], mean, atol=1e-5)           # the probabilities are unchanged by the extra channel
    assert torch.allclose(out[3], expected, atol=1e-5)
    assert (entropy(mean) - out[3] >= -1e-5).all()             # the disagreement is never negative (Jensen)


def test_uncertainty_maps_match_the_saved_probabilities_and_ranges_bracket_volumes(run_cli, coarse_model_dir, tmp_path):
    code, stdout, err = run_cli("predict", CT, "-t", "kidney", "-m", coarse_model_dir, "-o", tmp_path, "--json",
                                "--uncertainty", "--save-probabilities", "nifti")
    assert code == 0, err
    result = json.loads(stdout)
    assert set(result["outputs"]) >= {"uncertainty", "disagreement"}
    probabilities = np.asarray(nib.load(tmp_path / "example_ct_kidney_probabilities.nii.gz").dataobj, dtype=np.float64)
    probabilities = np.moveaxis(probabilities, -1, 0) if probabilities.ndim == 4 else probabilities
    q = probabilities / probabilities.sum(0, keepdims=True)
    brute = -(q * np.log(np.maximum(q, 1e-12))).sum(0) / math.log(q.shape[0])
    written = nib.load(tmp_path / "example_ct_kidney_uncertainty.nii.gz")
    assert written.get_data_dtype() == np.float32 and written.shape == nib.load(CT).shape
    assert np.allclose(np.asarray(written.dataobj), brute, atol=2e-3)   # the map comes from float16 probabilities
    disagreement = np.asarray(nib.load(tmp_path / "example_ct_kidney_disagreement.nii.gz").dataobj)
    assert disagreement.min() >= 0 and (disagreement <= np.asarray(written.dataobj) + 1e-6).all()
    for label in result["labels"]:
        low, high = label["confidence"]["volume_ml_range"]
        assert low <= label["volume_ml"] <= high
        if label["voxels"]:
            assert 0 < label["confidence"]["mean_probability"] <= 1 and 0 <= label["confidence"]["share_below"] <= 1


def test_without_tta_there_is_no_disagreement_map(run_cli, coarse_model_dir, tmp_path):
    code, stdout, err = run_cli("predict", CT, "-t", "spleen", "-m", coarse_model_dir, "-o", tmp_path, "--json",
                                "--uncertainty", "--no-tta")
    assert code == 0, err
    assert "uncertainty" in json.loads(stdout)["outputs"] and "disagreement" not in json.loads(stdout)["outputs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "example_ct_spleen.json", "example_ct_spleen.nii.gz", "example_ct_spleen_uncertainty.nii.gz"]


@pytest.fixture(scope="module")
def liver_map():
    seg = np.asarray(nib.load(SEG).dataobj)
    return np.where(seg == 5, 1, np.where(seg == 1, 2, np.where(np.isin(seg, (2, 3)), 3, 0))).astype(np.uint8)


def _flags(label_map, value, name, spacing_ml=0.027, confidence=None):
    voxels = int((label_map == value).sum())
    return structure_flags(name, (value,), voxels, round(voxels * spacing_ml, 3), MapGeometry(label_map, AXIAL),
                           confidence)


def test_whole_organs_in_the_scan_raise_no_flag(liver_map):
    inside = liver_map.copy()
    inside[:, :, -1] = 0   # TotalSegmentator's liver reaches the CT's top slice; one slice less is inside
    assert _flags(inside, 1, "liver") == [] and _flags(inside, 2, "spleen") == [] and _flags(inside, 3, "kidney") == []


def test_a_ct_cropped_through_the_liver_flags_its_border(liver_map):
    z = np.nonzero((liver_map == 1).any(axis=(0, 1)))[0]
    cropped = liver_map[:, :, : (z.min() + z.max()) // 2]
    [border] = [f for f in _flags(cropped, 1, "liver") if f["code"] == "border"]
    assert border == {"code": "border", "reason": "liver touches the border of the scan (last slice along "
                                                  "superior-inferior): cut off"}


def test_an_empty_expected_structure_is_flagged_missing_but_an_empty_tumour_is_not(liver_map):
    no_spleen = np.where(liver_map == 2, 0, liver_map)
    assert _flags(no_spleen, 2, "spleen") == [{"code": "missing", "reason": "spleen is empty"}]
    assert _flags(no_spleen, 4, "liver tumour") == []


def test_an_implausible_volume_is_flagged(liver_map):
    # the same liver voxels at 0.5 mm instead of 3 mm: 5 mL of liver
    [volume] = [f for f in _flags(liver_map, 1, "liver", spacing_ml=0.000125) if f["code"] == "volume"]
    assert volume["reason"].startswith("liver 5.212 mL,") and "outside the plausible adult 350-5000 mL" in volume["reason"]


def test_a_fragmented_liver_is_flagged(liver_map):
    broken = liver_map.copy()
    broken[:, :, ::4] = 0
    z = np.nonzero((broken == 1).any(axis=(0, 1)))[0]
    broken[:, :, z.max():] = 0
    [fragmented] = [f for f in _flags(broken, 1, "liver") if f["code"] == "fragmented"]
    assert "pieces, the largest holds" in fragmented["reason"]
    two_kidneys = _flags(liver_map, 3, "kidney")   # two pieces are what kidneys are
    assert not [f for f in two_kidneys if f["code"] == "fragmented"]


def test_low_confidence_is_flagged(liver_map):
    confident = {"mean_probability": 0.97, "share_below": 0.05, "threshold": 0.75}
    unsure = {"mean_probability": 0.62, "share_below": 0.7, "threshold": 0.75}
    inside = liver_map.copy()
    inside[:, :, -1] = 0
    assert _flags(inside, 1, "liver", confidence=confident) == []
    assert _flags(inside, 1, "liver", confidence=unsure) == [
        {"code": "low_confidence", "reason": "liver: mean probability 0.62, 70% of its voxels below 0.75"}]


def test_fail_on_counts_a_flagged_case_as_failed_and_keeps_its_outputs(run_cli, tmp_path):
    ct = nib.load(CT)
    seg = np.asarray(nib.load(SEG).dataobj)
    z = np.nonzero((seg == 5).any(axis=(0, 1)))[0]
    top = (z.min() + z.max()) // 2
    cropped = tmp_path / "cropped.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(ct.dataobj)[:, :, :top].astype(np.int16), ct.affine), cropped)
    out = tmp_path / "out"
    code, stdout, err = run_cli("predict", cropped, "-t", "liver", "-m", "uniseg-demo", "-o", out, "--json",
                                "--fail-on", "border")
    assert code == 1
    result = json.loads(stdout)
    assert result["failed_on"] == ["border"]
    [line] = [line for line in err.splitlines() if line.startswith("Error:")]
    assert line.startswith("Error: cropped: flagged border: liver touches the border of the scan (last slice along "
                           "superior-inferior): cut off") and line.endswith("; counted as failed (--fail-on)")
    record = json.loads((out / "cropped_liver.json").read_text())
    assert "border" in [f["code"] for f in record["result"]["flags"] if f["label"] == "liver"]
    # resumed, the finished case is skipped and still fails
    code, stdout, _ = run_cli("predict", cropped, "-t", "liver", "-m", "uniseg-demo", "-o", out, "--json",
                              "--fail-on", "border", "--skip-existing", "-q")
    assert code == 1 and json.loads(stdout)["skipped"] is True
    code, _, err = run_cli("predict", cropped, "-t", "liver", "-m", "uniseg-demo", "-o", out, "--fail-on", "colour")
    assert code == 2 and "--fail-on: unknown flag 'colour'" in err


def test_fail_on_parses_codes_and_any():
    assert parse_fail_on("border, missing") == {"border", "missing"}
    assert "low_confidence" in parse_fail_on("any")


def test_keep_largest_and_min_component_remove_only_the_small_pieces(liver_map):
    noisy = liver_map.copy()
    noisy[0:2, 0:2, 0:2] = 1        # a far-away speck of "liver"
    noisy[-2:, -2:, 0:2] = 3        # and of "kidney"
    removed = Removed()
    cleaned = clean_map(noisy, [(1, "liver"), (3, "kidney")], 0.027, PostProcessing(("liver", "kidney")), removed)
    assert np.array_equal(cleaned, liver_map)          # the specks go, both kidneys stay
    assert removed.voxels == {"liver": 8, "kidney": 8}
    removed = Removed()
    cleaned = clean_map(noisy, [(1, "liver"), (3, "kidney")], 0.027, PostProcessing((), 1.0), removed)
    assert np.array_equal(cleaned, liver_map) and removed.voxels == {"liver": 8, "kidney": 8}


def test_postprocessing_is_recorded(run_cli, tmp_path):
    code, stdout, err = run_cli("predict", CT, "-t", "kidney", "-m", "uniseg-demo", "-o", tmp_path, "--json",
                                "--keep-largest", "kidney", "--min-component-ml", "0.5")
    assert code == 0, err
    done = json.loads(stdout)["postprocessing"]
    assert done["keep_largest"] == ["kidney"] and done["min_component_ml"] == 0.5
    assert set(done["removed_voxels"]) <= {"kidney", "kidney tumour"}
    code, _, err = run_cli("predict", CT, "-t", "kidney", "-m", "uniseg-demo", "-o", tmp_path, "--keep-largest", "lung")
    assert code == 2 and "--keep-largest: no label 'lung' in the model" in err
