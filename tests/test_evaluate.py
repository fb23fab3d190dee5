"""`uniseg evaluate`: metric values on hand-built cases, the empty-mask convention, the CLI."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from uniseg_cli.metrics import score_label


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with one of their 6 face neighbours outside it (outside the image counts),
    written with array shifts so that the reference shares no code with the module's erosion."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = tuple(slice(1, -1) for _ in range(3))
    exposed = np.zeros_like(mask)
    for axis in range(3):
        for shift in (-1, 1):
            exposed |= ~np.roll(padded, shift, axis=axis)[inner]
    return mask & exposed


def _brute_force(p: np.ndarray, r: np.ndarray, spacing, tolerance: float) -> tuple[float, float]:
    """HD95 and NSD from all pairwise distances between the two surfaces' voxel centres."""
    a = np.argwhere(_surface(p)) * np.asarray(spacing)
    b = np.argwhere(_surface(r)) * np.asarray(spacing)
    d = cdist(a, b)
    a_to_b, b_to_a = d.min(1), d.min(0)
    hd95 = max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95))
    nsd = ((a_to_b <= tolerance).sum() + (b_to_a <= tolerance).sum()) / (len(a_to_b) + len(b_to_a))
    return hd95, nsd


def _cube(shape, low, size):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(l, l + s) for l, s in zip(low, size))] = True
    return mask


def _sphere(shape, centre, radius, spacing=(1, 1, 1)):
    grid = np.indices(shape).astype(float)
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing)) <= radius ** 2


def test_identical_masks():
    mask = _sphere((20, 20, 20), (10, 10, 10), 6)
    score = score_label(mask, mask, (1, 1, 1), 1.0)
    assert (score.dice, score.hd95, score.nsd) == (1.0, 0.0, 1.0)


def test_two_single_voxels_in_anisotropic_space():
    p, r = np.zeros((8, 4, 4), bool), np.zeros((8, 4, 4), bool)
    p[0, 1, 1] = r[5, 1, 1] = True
    score = score_label(p, r, (2.0, 1.0, 1.0), 1.0)
    assert score.dice == 0.0 and score.hd95 == pytest.approx(10.0) and score.nsd == 0.0
    assert score_label(p, r, (2.0, 1.0, 1.0), 10.0).nsd == 1.0


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 0.8, 0.8)])
def test_shifted_cubes(spacing):
    shape = (24, 24, 24)
    p = _cube(shape, (6, 6, 6), (10, 10, 10))
    r = _cube(shape, (8, 6, 6), (10, 10, 10))          # shifted by 2 voxels along z
    score = score_label(p, r, spacing, 2.0)
    assert score.dice == pytest.approx(0.8)              # overlap 8 of 10 slices
    hd95, nsd = _brute_force(p, r, spacing, 2.0)
    assert score.hd95 == pytest.approx(hd95) and score.nsd == pytest.approx(nsd)
    assert score.hd95 <= 2 * spacing[0] + 1e-9           # no surface point is farther than the shift


def test_concentric_spheres():
    p = _sphere((40, 40, 40), (20, 20, 20), 8)
    r = _sphere((40, 40, 40), (20, 20, 20), 11)
    score = score_label(p, r, (1, 1, 1), 1.0)
    assert score.dice == pytest.approx(2 * p.sum() / (p.sum() + r.sum()))
    assert 2.0 <= score.hd95 <= 4.0                      # radii differ by 3 mm, up to a voxel of discretisation
    hd95, nsd = _brute_force(p, r, (1, 1, 1), 1.0)
    assert score.hd95 == pytest.approx(hd95) and score.nsd == pytest.approx(nsd) and nsd < 0.2


def test_masks_on_the_border_of_a_larger_image():
    """Surfaces and distances are computed in the masks' box: a mask cut by the image border keeps its
    border face, and the figures equal the whole image's."""
    shape, spacing = (30, 50, 44), (2.5, 0.9, 0.7)
    p = _cube(shape, (0, 3, 30), (6, 12, 14))                                   # on two image borders
    r = _sphere(shape, (3, 10, 36), 5, spacing) | _cube(shape, (20, 40, 2), (3, 3, 3))   # and a far island
    score = score_label(p, r, spacing, 2.0)
    hd95, nsd = _brute_force(p, r, spacing, 2.0)
    assert score.hd95 == pytest.approx(hd95) and score.nsd == pytest.approx(nsd) and 0 < nsd < 1
    assert score.dice == pytest.approx(2 * (p & r).sum() / (p.sum() + r.sum()))


def test_empty_mask_convention():
    empty, full = np.zeros((5, 5, 5), bool), _cube((5, 5, 5), (1, 1, 1), (2, 2, 2))
    both = score_label(empty, empty, (1, 1, 1), 1.0)
    assert (both.dice, both.hd95, both.nsd) == (1.0, 0.0, 1.0)
    for p, r in ((empty, full), (full, empty)):
        one = score_label(p, r, (1, 1, 1), 1.0)
        assert (one.dice, one.hd95, one.nsd) == (0.0, None, 0.0)


def _save(path, array, spacing=(1.0, 1.0, 1.0)):
    nib.save(nib.Nifti1Image(array.astype(np.uint8), np.diag([*spacing, 1.0])), path)


def test_cli_folders_json_csv_and_mismatched_grid(run_cli, tmp_path):
    shape = (24, 24, 24)
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    ref1 = _cube(shape, (6, 6, 6), (10, 10, 10)).astype(np.uint8)
    ref1[15:18, 15:18, 15:18] = 2
    pred1 = ref1.copy()
    pred1[ref1 == 2] = 0                                   # label 2 missed entirely
    ref2 = _cube(shape, (4, 4, 4), (8, 8, 8)).astype(np.uint8)
    _save(tmp_path / "ref/case1.nii.gz", ref1)
    _save(tmp_path / "ref/case2.nii.gz", ref2)
    _save(tmp_path / "pred/case1_kidney.nii.gz", pred1)   # uniseg predict's naming
    _save(tmp_path / "pred/case2.nii.gz", ref2)
    code, out, err = run_cli("evaluate", tmp_path / "pred", tmp_path / "ref", "--json", "--csv", tmp_path / "m.csv")
    assert code == 0, err
    result = json.loads(out)
    assert [c["case"] for c in result["cases"]] == ["case1", "case2"]
    case1 = result["cases"][0]["labels"]
    assert case1["2"] == {"dice": 0.0, "hd95": None, "nsd": 0.0, "reference_voxels": 27, "predicted_voxels": 0}
    assert result["summary"]["1"]["dice"] == {"mean": 1.0, "std": 0.0, "n": 2}
    assert result["summary"]["2"]["hd95"] == {"mean": None, "std": None, "n": 0}
    rows = (tmp_path / "m.csv").read_text().splitlines()
    assert rows[0].startswith("case,label,dice,hd95_mm,nsd") and any(r.startswith("mean,1,1.0") for r in rows)

    code, out, _ = run_cli("evaluate", tmp_path / "pred/case2.nii.gz", tmp_path / "ref/case2.nii.gz")
    assert code == 0 and "1 case(s)" in out

    _save(tmp_path / "pred/case2.nii.gz", ref2, spacing=(2.0, 1.0, 1.0))
    code, _, err = run_cli("evaluate", tmp_path / "pred", tmp_path / "ref")
    assert code == 1 and "case2.nii.gz: not on the reference's grid: it is 24×24×24 voxels at 2×1×1 mm, not" in err
    (tmp_path / "pred/case2.nii.gz").unlink()
    code, _, err = run_cli("evaluate", tmp_path / "pred", tmp_path / "ref")
    assert code == 2 and "no prediction for case 'case2'" in err


@pytest.mark.parametrize("damage, message", [
    (lambda ref: ref.astype(np.float32) + 0.5, "13824 voxel(s) are not non-negative integers (e.g. 0.5); "
     "evaluate takes label maps, not probabilities or intensities"),
    (lambda ref: np.stack([ref, ref], axis=-1).astype(np.float32), "has 2 channels (a probability map?); "
     "evaluate takes label maps, one integer value per voxel"),
])
def test_float_and_multichannel_predictions_are_refused(run_cli, tmp_path, damage, message):
    """Cast to integers, reference + 0.5 scored Dice 1.0 and a probability stack scored as a label map."""
    ref = _cube((24, 24, 24), (2, 3, 4), (10, 10, 10)).astype(np.uint8)
    nib.save(nib.Nifti1Image(ref, np.eye(4)), tmp_path / "ref.nii.gz")
    nib.save(nib.Nifti1Image(damage(ref), np.eye(4)), tmp_path / "pred.nii.gz")
    code, out, err = run_cli("evaluate", tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz")
    assert code == 1 and out == "" and err.strip() == f"Error: {tmp_path / 'pred.nii.gz'}: {message}"


def test_predictions_without_a_reference_are_listed_not_dropped(run_cli, tmp_path):
    ref = _cube((24, 24, 24), (4, 4, 4), (8, 8, 8)).astype(np.uint8)
    for folder, names in (("ref", ["a"]), ("pred", ["a_kidney", "b_kidney"])):
        (tmp_path / folder).mkdir()
        for name in names:
            _save(tmp_path / folder / f"{name}.nii.gz", ref)
    code, out, err = run_cli("evaluate", tmp_path / "pred", tmp_path / "ref", "--json")
    result = json.loads(out)
    assert code == 0 and [c["case"] for c in result["cases"]] == ["a"]
    assert result["unmatched_predictions"] == [str(tmp_path / "pred" / "b_kidney.nii.gz")]
    assert f"{tmp_path / 'pred' / 'b_kidney.nii.gz'}: no reference for this prediction" in err
    code, out, _ = run_cli("evaluate", tmp_path / "pred", tmp_path / "ref")
    assert "1 case(s); NSD tolerance 1 mm; 1 prediction(s) without a reference, not scored" in out


def test_a_label_in_no_map_is_refused_and_predict_folders_are_scored(run_cli, coarse_model_dir, tmp_path):
    """`--labels 99` scored Dice 1.0; a folder with --save-probabilities or --split outputs could not be scored."""
    import shutil

    from conftest import CT, DATA

    refs = tmp_path / "refs"
    refs.mkdir()
    shutil.copy(DATA / "example_seg_fast_force_split.nii.gz", refs / "example_ct.nii.gz")
    pred = tmp_path / "pred"
    code, _, err = run_cli("predict", CT, "-t", "liver,spleen", "-m", coarse_model_dir, "-o", pred, "--no-tta",
                           "--split", "--save-probabilities", "nifti")
    assert code == 0, err
    code, _, err = run_cli("evaluate", pred, refs)
    assert code == 2 and ("several predictions match case 'example_ct' (example_ct_liver.nii.gz, "
                          "example_ct_spleen.nii.gz; --split maps?): pick one task's with --task, e.g. --task liver") in err
    code, stdout, err = run_cli("evaluate", pred, refs, "--task", "spleen", "--labels", "1", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert [c["prediction"] for c in result["cases"]] == [str(pred / "example_ct_spleen.nii.gz")]
    code, _, err = run_cli("evaluate", pred / "example_ct_spleen.nii.gz", refs / "example_ct.nii.gz", "--labels", "250")
    assert code == 2 and "--labels 250: no voxel has this value in any prediction or reference (1 case(s))" in err
