"""The BraTS region dataset of ``tools/brats2015_to_nnunet.py`` from the real BraTS 2015 cases (CC BY-NC-SA,
so only where ../shared/data holds them; nothing of them is shipped): what the tool writes, and a tiny
fine-tune that trains, predicts and scores the three nested regions end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SHARED_DATA

BRATS = SHARED_DATA / "brats2015_deepmedic"
TOOL = Path(__file__).resolve().parents[1] / "tools" / "brats2015_to_nnunet.py"
pytestmark = pytest.mark.skipif(not BRATS.is_dir(), reason="needs ../shared/data/brats2015_deepmedic")


@pytest.fixture(scope="module")
def brats_regions(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw") / "Dataset137_BraTS"
    subprocess.run([sys.executable, str(TOOL), str(out), "--shared", str(SHARED_DATA), "--regions"], check=True)
    return out


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_the_tool_writes_skull_stripped_images_and_nested_regions(brats_regions):
    case = BRATS / "train" / "brats_2013_pat0005_1"
    brain = _array(case / "brainmask.nii.gz") > 0
    source = _array(case / "Flair_subtrMeanDivStd.nii.gz")
    written = _array(brats_regions / "imagesTr" / "brats_2013_pat0005_1_0000.nii.gz")
    assert source[~brain].min() < -1                       # the source's background is not zero …
    assert np.all(written[~brain] == 0)                    # … the dataset's is, as skull-stripped BraTS is
    assert np.array_equal(written[brain], source[brain])   # and the brain is untouched
    labels = _array(brats_regions / "labelsTr" / "brats_2013_pat0005_1.nii.gz")
    original = _array(case / "OTMultiClass.nii.gz")
    assert np.array_equal(labels > 0, original > 0)                       # whole tumour: source 1, 2, 3, 4
    assert np.array_equal(np.isin(labels, (2, 3)), np.isin(original, (1, 3, 4)))   # tumour core: 1, 3, 4
    assert np.array_equal(labels == 3, original == 4)                     # enhancing: 4
    meta = json.loads((brats_regions / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3],
                              "enhancing tumour": [3]} and meta["regions_class_order"] == [1, 2, 3]
    assert json.loads((brats_regions / "splits.json").read_text())[0]["val"] == ["brats_2013_pat0003_1",
                                                                               "brats_2013_pat0004_1"]


def test_preprocessing_crops_the_brats_case_to_the_brain(brats_regions, tmp_path):
    from uniseg_cli.data.training_cache import preprocess_datasets

    (data,) = preprocess_datasets([f"brats_regions={brats_regions}"], tmp_path / "prep", workers=1, progress=False,
                                  target_spacing=(2.0, 2.0, 2.0))
    shape = np.asarray(data.image("brats_2013_pat0005_1")).shape
    assert shape[0] == 2 and all(s < full for s, full in zip(shape[1:], (78, 120, 120)))
    assert data.task.regions == ((1, 2, 3), (2, 3), (3,))


def test_a_tiny_brats_finetune_scores_every_region(run_cli, small_model_dir, brats_regions, tmp_path):
    out = tmp_path / "ft"
    code, _, err = run_cli("finetune", brats_regions, "-m", small_model_dir, "-o", out, "--split-file",
                           brats_regions / "splits.json", "--target-spacing", "6,6,6", "--epochs", "1",
                           "--batches-per-task", "2", "--no-tta", "--device", "cpu", "-j", "0", "-q")
    assert code == 0, err
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert list(evaluation["summary"]) == ["whole tumour", "tumour core", "enhancing tumour"]
    assert [c["case"] for c in evaluation["cases"]] == ["brats_2013_pat0003_1", "brats_2013_pat0004_1"]
    config = json.loads((out / "config.json").read_text())["tasks"][0]
    assert config["regions"] == [[1, 2, 3], [2, 3], [3]] and config["region_order"] == [1, 2, 3]
    # the regions' outputs say what they hold: the JSON record, the label table and Slicer's file
    images = brats_regions / "imagesTr"
    case = "brats_2013_pat0003_1"
    channels = ",".join(str(images / f"{case}_{c:04d}.nii.gz") for c in range(2))
    pred = tmp_path / "pred"
    code, stdout, err = run_cli("predict", channels, "-t", config["key"], "-m", out, "-o", pred, "--no-tta",
                                "-f", "nifti,seg-nrrd", "--json", "-q")
    assert code == 0, err
    record = json.loads(stdout)
    assert [r["name"] for r in record["labels"]] == ["whole tumour without tumour core",
                                                     "tumour core without enhancing tumour", "enhancing tumour"]
    regions = {r["name"]: r for r in record["regions"]}
    assert list(regions) == ["whole tumour", "tumour core", "enhancing tumour"]
    labels = _array(Path(record["output"]))
    assert regions["whole tumour"]["voxels"] == int((labels > 0).sum()) > 0
    code, scored, err = run_cli("evaluate", record["output"], brats_regions / "labelsTr" / f"{case}.nii.gz",
                                "--regions", "whole=1,2,3;core=2,3;enhancing=3", "--json")
    assert code == 0, err
    counted = json.loads(scored)["cases"][0]["labels"]
    assert [counted[n]["predicted_voxels"] for n in ("whole", "core", "enhancing")] == [
        regions[n]["voxels"] for n in ("whole tumour", "tumour core", "enhancing tumour")]
    import slicerio

    segmentation = slicerio.read_segmentation(record["outputs"]["seg-nrrd"])
    assert [s["name"] for s in segmentation["segments"]] == list(regions)
    for name, values in (("whole tumour", (1, 2, 3)), ("tumour core", (2, 3)), ("enhancing tumour", (3,))):
        mask = slicerio.segment_mask(segmentation, name).transpose(2, 1, 0)
        assert np.array_equal(mask, np.isin(labels, values)) and int(mask.sum()) == regions[name]["voxels"]
