"""Input plausibility (uniseg_cli.quality.plausibility): every real scan passes as what it is, and bad
variants of those scans are refused before any network pass, one line naming the file, the channel
and the evidence, exit 1, nothing written; --accept-implausible segments them with a flag."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from conftest import CT, DATA, DICOM, SHARED_DATA, write_kidney_dataset, write_pet_like
from uniseg_cli.io.images import read_channels
from uniseg_cli.quality.plausibility import check_inputs
from uniseg_cli.tasks import Channel

MR = DATA / "example_mr_sm.nii.gz"
CT_CHANNEL = Channel("CT", "CT", "ct", (-1000.0, 1000.0))
MR_CHANNEL = Channel("T2", "MR")

REAL_CT = [CT, DICOM, DATA / "ct_dicom_3slice"]
REAL_MR = [MR] + [SHARED_DATA / p for p in (
    "brats2021_flair/imagesTr/BraTS2021_01646.nii.gz", "mr_lesions_pyradiomics/brain1_image.nrrd",
    "mr_lesions_pyradiomics/brain2_image.nrrd", "mr_lesions_pyradiomics/breast1_image.nrrd",
    "prostatex_t2_adc_nolabel/test_0000_t2_tse_tra_4.nii.gz", "prostatex_t2_adc_nolabel/test_0000_ep2d_diff_tra_7.nii.gz",
    "brats2015_deepmedic/train/brats_2013_pat0005_1/Flair_subtrMeanDivStd.nii.gz",
    "brain_tcga_4ch/TCGA-DU-7294/TCGA-DU-7294_brainles/raw_bet/TCGA-DU-7294_t1_bet.nii.gz")]


def _findings(path, channel):
    data, geometry = read_channels([path], allow_gaps=True)
    return check_inputs(data, [channel], [str(path)], geometry.modalities)


@pytest.mark.parametrize("path", REAL_CT, ids=lambda p: p.name)
def test_every_real_ct_passes_as_ct_and_is_refused_as_mr(path):
    assert _findings(path, CT_CHANNEL) == []
    [finding] = _findings(path, MR_CHANNEL)
    if path.is_dir():  # a DICOM series says what it is
        assert finding.code == "dicom_modality" and "the DICOM series is CT; the task's channel T2 is MR" in finding.line()
    else:
        assert finding.code == "looks_like_ct" and finding.evidence.endswith("a CT, not an MR")


@pytest.mark.parametrize("path", REAL_MR, ids=lambda p: p.name)
def test_every_real_mr_passes_as_mr_and_is_refused_as_ct(path):
    if not path.exists():
        pytest.skip(f"{path} is not here (../shared/data)")
    assert _findings(path, MR_CHANNEL) == []
    [finding] = _findings(path, CT_CHANNEL)
    assert finding.code == "not_hu" and "not a CT in HU" in finding.evidence


def _variant(tmp_path, name, change, dtype=np.float32):
    image = nib.load(CT)
    values = np.asarray(image.dataobj, dtype=np.float32)
    path = tmp_path / f"{name}.nii.gz"
    nib.Nifti1Image(change(values).astype(dtype), image.affine).to_filename(path)
    return path


VARIANTS = {
    "offset": (lambda v: v + 1024, np.int16, "hu_offset", "looks like HU + 1024 (a missing rescale intercept)"),
    "zero": (lambda v: v * 0, np.int16, "constant", "every voxel is 0: a constant image"),
    "nearly_zero": (lambda v: np.where(np.arange(v.size).reshape(v.shape) % 500 == 0, 5.0, 0.0), np.int16,
                    "constant", "at least 99% of the voxels are 0: a near-constant image"),
    "unit": (lambda v: (v - v.min()) / (v.max() - v.min()), np.float32, "not_hu", "values 0 to 1: a rescaled image"),
    "byte": (lambda v: np.round((np.clip(v, -1000, 1000) + 1000) / 2000 * 255), np.uint8, "not_hu",
             "values 0 to 255: an 8-bit image"),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_bad_variants_of_the_real_ct_are_refused(tmp_path, name):
    change, dtype, code, evidence = VARIANTS[name]
    [finding] = _findings(_variant(tmp_path, name, change, dtype), CT_CHANNEL)
    assert finding.code == code and evidence in finding.evidence


def test_a_refused_scan_is_one_line_exit_1_and_nothing_written(run_cli, coarse_model_dir, tmp_path):
    bad = _variant(tmp_path, "offset", VARIANTS["offset"][0], np.int16)
    out = tmp_path / "out"
    code, stdout, err = run_cli("predict", bad, "-t", "spleen", "-m", coarse_model_dir, "-o", out, "--json", "-q")
    assert code == 1
    assert err.strip().splitlines() == [
        f"Error: {bad}: channel CT: 1st percentile 12, median 923: looks like HU + 1024 (a missing rescale "
        "intercept), not a CT in HU; --accept-implausible segments it anyway"]
    assert json.loads(stdout)["error"].startswith(f"{bad}: channel CT: 1st percentile 12")
    assert not out.exists() or list(out.iterdir()) == []


def test_accept_implausible_segments_it_with_a_warning_and_a_flag(run_cli, coarse_model_dir, tmp_path):
    bad = _variant(tmp_path, "offset", VARIANTS["offset"][0], np.int16)
    code, stdout, err = run_cli("predict", bad, "-t", "spleen", "-m", coarse_model_dir, "-o", tmp_path / "out",
                                "--json", "--accept-implausible")
    assert code == 0, err
    assert "looks like HU + 1024 (a missing rescale intercept), not a CT in HU (accepted: --accept-implausible)" in err
    result = json.loads(stdout)
    [override] = [f for f in result["flags"] if f["code"] == "input_override"]
    assert override["label"] is None and override["reason"].startswith(f"{bad}: channel CT: 1st percentile 12")
    record = json.loads((tmp_path / "out" / "offset_spleen.json").read_text())
    assert record["result"]["flags"] == result["flags"]


def test_an_mr_given_to_a_ct_task_is_refused(run_cli, coarse_model_dir, tmp_path):
    code, _, err = run_cli("predict", MR, "-t", "liver", "-m", coarse_model_dir, "-o", tmp_path / "out", "-q")
    assert code == 1
    assert err.strip() == (f"Error: {MR}: channel CT: 1st percentile -2, 0.0% of voxels at or below -800 (no air): "
                           "not a CT in HU; --accept-implausible segments it anyway")


def test_two_channels_that_are_one_file_or_the_same_voxels_are_refused(run_cli, coarse_model_dir, tmp_path):
    code, _, err = run_cli("predict", f"{CT},{CT}", "-t", "pet_lesion", "-m", coarse_model_dir, "-o", tmp_path, "-q")
    assert code == 1 and err.strip() == (f"Error: {CT}: channel PET: is the same file as channel CT; "
                                         "--accept-implausible segments it anyway")
    copy = shutil.copy(CT, tmp_path / "copy.nii.gz")
    code, _, err = run_cli("predict", f"{CT},{copy}", "-t", "pet_lesion", "-m", coarse_model_dir, "-o", tmp_path, "-q")
    assert code == 1 and err.strip() == (f"Error: {copy}: channel PET: holds the same voxels as channel CT ({CT}); "
                                         "--accept-implausible segments it anyway")
    pet = write_pet_like(tmp_path / "pet.nii.gz")  # a real pair passes
    code, _, err = run_cli("predict", f"{CT},{pet}", "-t", "pet_lesion", "-m", coarse_model_dir, "-o", tmp_path, "-q")
    assert code == 0, err


def test_a_dicom_ct_series_given_to_an_mr_task_is_refused_by_its_modality_tag(run_cli, coarse_model_dir, tmp_path):
    code, _, err = run_cli("predict", DICOM, "-t", "prostate", "-m", coarse_model_dir, "-o", tmp_path / "o", "-q")
    assert code == 1 and err.strip() == (f"Error: {DICOM}: channel T2: the DICOM series is CT; the task's channel T2 "
                                         "is MR; --accept-implausible segments it anyway")


def test_all_and_task_lists_pick_tasks_by_the_scans_modality(run_cli, coarse_model_dir, tmp_path):
    # Before, a 1-channel MR under 'all' got every CT task (the channel count fits).
    code, stdout, err = run_cli("predict", MR, "-t", "all", "-m", coarse_model_dir, "-o", tmp_path / "mr", "--json")
    assert code == 0, err
    assert {r["task"] for r in json.loads(stdout)["labels"]} == {"prostate"}
    assert "taken for MR (0% of voxels below -500); left out liver, kidney" in err
    code, stdout, err = run_cli("predict", CT, "-t", "all", "-m", coarse_model_dir, "-o", tmp_path / "ct", "--json")
    assert code == 0, err
    assert "prostate" not in {r["task"] for r in json.loads(stdout)["labels"]}
    code, _, err = run_cli("predict", MR, "-t", "liver,spleen", "-m", coarse_model_dir, "-o", tmp_path / "l", "-q")
    assert code == 1 and err.strip() == (
        f"Error: {MR}: no listed task of the model takes an MR scan with 1 channel(s) (taken for MR: 0% of voxels "
        "below -500; --modality says otherwise)")


def test_training_refuses_an_implausible_scan_and_labels_that_are_all_background(run_cli, tmp_path):
    bad = write_kidney_dataset(tmp_path / "Dataset002_Offset")
    image = nib.load(bad / "imagesTr/ct1_0000.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj) + 1024, image.affine), bad / "imagesTr/ct1_0000.nii.gz")
    code, _, err = run_cli("preprocess", "-d", bad, "-o", tmp_path / "p1", "-j", "1", "-q")
    assert code == 1 and err.strip().startswith(f"Error: {bad / 'imagesTr/ct1_0000.nii.gz'}: channel CT: 1st percentile")
    assert err.strip().endswith("--accept-implausible trains on it anyway")
    code, _, err = run_cli("preprocess", "-d", bad, "-o", tmp_path / "p2", "-j", "1", "--accept-implausible")
    assert code == 0 and "(accepted: --accept-implausible)" in err

    empty = write_kidney_dataset(tmp_path / "Dataset003_Empty", classes=lambda seg: seg * 0)
    code, _, err = run_cli("preprocess", "-d", empty, "-o", tmp_path / "p3", "-j", "1", "-q")
    assert code == 1 and err.strip() == (f"Error: {empty}: every label map of its 3 case(s) is background only: "
                                         "nothing to learn (are the labels in another folder, or all 0?)")
    never = write_kidney_dataset(tmp_path / "Dataset004_Never", classes=lambda seg: np.isin(seg, (2, 3)),
                                 meta={"labels": {"background": 0, "kidney": 1, "cyst": 2}})
    code, _, err = run_cli("preprocess", "-d", never, "-o", tmp_path / "p4", "-j", "1")
    assert code == 0, err
    assert f"{never}: label 'cyst' (value 2) occurs in none of its 3 case(s); the model will never predict it" in err
