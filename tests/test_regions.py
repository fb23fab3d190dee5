"""Region-based training (nnU-Net v2's regions): nested structures as sigmoid outputs, from dataset.json
to predict and evaluate, on a region dataset made from the real CT (kidneys ⊃ left kidney); and the
sampler's class coverage."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CT, write_kidney_dataset

REGIONS = {"background": 0, "kidneys": [1, 2], "left kidney": [2]}


def write_region_dataset(root, *, labels=REGIONS, order=(1, 2), slabs=((0, 60), (26, 86), (52, 112))):
    """Axial slabs of the real CT; right kidney 1, left kidney 2; declared as nested regions."""
    meta = {"labels": labels, **({"regions_class_order": list(order)} if order is not None else {})}
    return write_kidney_dataset(root, slabs=slabs, meta=meta,   # TotalSegmentator: 2 right kidney, 3 left
                                classes=lambda seg: np.select([seg == 2, seg == 3], [1, 2], 0))


@pytest.fixture(scope="module")
def region_dataset(tmp_path_factory):
    return write_region_dataset(tmp_path_factory.mktemp("raw") / "Dataset010_KidneyRegions")


@pytest.fixture(scope="module")
def region_prep(region_dataset, tmp_path_factory):
    from uniseg_cli.data.training_cache import preprocess_datasets

    out = tmp_path_factory.mktemp("prep") / "prep"
    preprocess_datasets([f"kidney_regions={region_dataset}"], out, workers=1, progress=False,
                        target_spacing=(6.0, 6.0, 6.0))
    return out


def test_a_region_dataset_becomes_a_region_task(region_prep):
    from uniseg_cli.data.training_cache import read_plan
    from uniseg_cli.tasks import Task

    (data,) = read_plan(region_prep)
    task = data.task
    assert task.labels == ("kidneys", "left kidney") and task.regions == ((1, 2), (2,)) and task.region_order == (1, 2)
    manager = task.label_manager
    assert manager.num_outputs == 2 and manager.head.sigmoid                   # one sigmoid per region, no background
    assert [(r.name, r.values) for r in manager.regions] == [("kidneys", (1, 2)), ("left kidney", (2,))]
    # class 1 is not "kidneys": it is the kidneys without the left one
    assert [(c.name, c.values) for c in manager.classes] == [("kidneys without left kidney", (1,)),
                                                            ("left kidney", (2,))]
    assert Task.from_dict(task.to_dict()) == task                              # config.json carries the regions
    assert set(np.unique(np.asarray(data.labels("ct1")))) == {0, 1, 2}


@pytest.mark.parametrize("labels, order, message", [
    (REGIONS, None, "label 'kidneys' is a region (list of values); a region dataset needs regions_class_order"),
    (REGIONS, (1,), "regions_class_order must list one label value per region (2: kidneys, left kidney)"),
    (REGIONS, (2, 2), "regions_class_order [2, 2] must write each label value of the regions ([1, 2]) once"),
    ({"background": 0, "kidneys": [0, 1]}, (1,), "region 'kidneys' must list foreground values"),
])
def test_malformed_regions_are_one_line(run_cli, tmp_path, labels, order, message):
    root = write_region_dataset(tmp_path / "raw", labels=labels, order=order, slabs=((0, 60),))
    code, _, err = run_cli("preprocess", "-d", f"r={root}", "-o", tmp_path / "prep")
    assert code == 1 and f"{root / 'dataset.json'}: {message}" in err


def test_region_loss_matches_a_hand_computation():
    from uniseg_cli.training.loss import DICE_SMOOTH, region_dice_bce_loss

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, 5, generator=generator)                  # 4 network outputs, 2 regions used
    target = torch.randint(0, 4, (2, 3, 5, 5), generator=generator)       # class 3 lies in no region
    regions = ((1, 2), (2,))
    masks = [((target == 1) | (target == 2)).float(), (target == 2).float()]
    bce = np.mean([torch.nn.functional.binary_cross_entropy_with_logits(logits[:, i], m).item()
                   for i, m in enumerate(masks)])
    dice = []
    for i, m in enumerate(masks):
        p = torch.sigmoid(logits[:, i])
        tp, fp, fn = (p * m).sum(), (p * (1 - m)).sum(), ((1 - p) * m).sum()
        dice.append(((2 * tp + DICE_SMOOTH) / (2 * tp + fp + fn + DICE_SMOOTH)).item())
    assert float(region_dice_bce_loss(logits, target, regions)) == pytest.approx(bce - np.mean(dice), rel=1e-5)


def test_regions_become_labels_in_region_order():
    from uniseg_cli.data.preprocessing import labels_from_regions

    probabilities = torch.tensor([[0.9, 0.9, 0.2, 0.6], [0.1, 0.7, 0.9, 0.4]])[..., None, None]  # 2 regions, 4 voxels
    assert labels_from_regions(probabilities, (1, 2)).flatten().tolist() == [1, 2, 2, 1]  # the later region wins
    assert labels_from_regions(probabilities, (2, 1)).flatten().tolist() == [2, 1, 1, 2]


def test_train_predict_and_evaluate_a_region_task(run_cli, region_prep, tmp_path):
    out = tmp_path / "model"
    code, _, err = run_cli("train", region_prep, "-o", out, "--preset", "small", "--epochs", "2",
                           "--batches-per-task", "2", "--val-every", "1", "--device", "cpu", "-j", "0")
    assert code == 0, err
    task = json.loads((out / "config.json").read_text())["tasks"][0]
    assert task["regions"] == [[1, 2], [2]] and task["region_order"] == [1, 2]
    records = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert set(records[0]["dice"]["kidney_regions"]) == {"kidneys", "left kidney"}   # validated per region
    assert set(records[0]["train_dice"]["kidney_regions"]) == {"kidneys", "left kidney"}  # and logged per region
    code, stdout, err = run_cli("predict", CT, "-t", "kidney_regions", "-m", out, "-o", tmp_path / "pred.nii.gz",
                                "--no-tta", "--save-probabilities", "npz", "--json", "-q")
    assert code == 0, err
    labels = np.asarray(nib.load(tmp_path / "pred.nii.gz").dataobj)
    probabilities = np.load(tmp_path / "pred_probabilities.npz")["kidney_regions"].astype(np.float32)
    assert probabilities.shape == (2, *labels.shape[::-1])                    # one sigmoid per region
    expected = np.where(probabilities[1] > 0.5, 2, np.where(probabilities[0] > 0.5, 1, 0)).transpose(2, 1, 0)
    clear = (np.abs(probabilities - 0.5) > 1e-3).all(axis=0).transpose(2, 1, 0)  # float16 rounds near 0.5
    assert clear.mean() > 0.9 and np.array_equal(expected[clear], labels[clear])
    record = json.loads(stdout)
    assert [(r["value"], r["name"]) for r in record["labels"]] == [(1, "kidneys without left kidney"),
                                                                   (2, "left kidney")]
    counts = np.bincount(labels.ravel(), minlength=3)
    assert [(r["name"], r["values"], r["voxels"]) for r in record["regions"]] == [
        ("kidneys", [1, 2], int(counts[1] + counts[2])), ("left kidney", [2], int(counts[2]))]

    table = json.loads((tmp_path / "pred.json").read_text())                  # the label table lists both
    assert [(e["value"], e["name"]) for e in table["labels"]] == [(1, "kidneys without left kidney"),
                                                                  (2, "left kidney")]
    assert [(e["values"], e["name"]) for e in table["regions"]] == [([1, 2], "kidneys"), ([2], "left kidney")]
    # the region volumes are the voxels evaluate --regions counts on the same map
    reference = tmp_path / "ref.nii.gz"
    image = nib.load(tmp_path / "pred.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(labels.shape, np.uint8), image.affine), reference)   # an empty reference
    code, stdout, err = run_cli("evaluate", tmp_path / "pred.nii.gz", reference, "--regions",
                                "kidneys=1,2;left=2", "--json")
    assert code == 0, err
    scores = json.loads(stdout)["cases"][0]["labels"]
    assert [scores[n]["predicted_voxels"] for n in ("kidneys", "left")] == [r["voxels"] for r in record["regions"]]
    code, _, err = run_cli("evaluate", tmp_path / "pred.nii.gz", tmp_path / "pred.nii.gz", "--regions", "kidneys=")
    assert code == 2 and "expected NAME=V,V,…;NAME=V,…" in err


def test_finetune_on_a_region_dataset_evaluates_regions(run_cli, small_model_dir, region_dataset, tmp_path):
    out = tmp_path / "ft"
    code, _, err = run_cli("finetune", region_dataset, "-m", small_model_dir, "-o", out, "--epochs", "1",
                           "--batches-per-task", "2", "--target-spacing", "6,6,6", "--no-tta", "--device", "cpu",
                           "-j", "0", "-q")
    assert code == 0, err
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert list(evaluation["summary"]) == ["kidneys", "left kidney"]


def test_foreground_samples_pick_each_class_present_equally_often(region_prep):
    """The forced third of each batch picks a class uniformly before a voxel: the left and right kidney
    are drawn about equally often although they differ in size, and each forced patch holds its class."""
    from uniseg_cli.data.training_cache import read_plan
    from uniseg_cli.training.sampling import PatchBatches

    data = read_plan(region_prep)
    counts = np.asarray(data[0].labels("ct1"))
    assert (counts == 1).sum() != (counts == 2).sum()
    batches = PatchBatches(data, [["ct1"]], (16, 16, 16), 3, seed=0, spatial=None)
    chosen = []
    for i in range(400):
        batch = batches[(0, i, 0)]
        chosen.append(batch["classes"][2])
        assert batch["labels"][2].eq(chosen[-1]).any()
    frequencies = np.bincount(chosen, minlength=3) / len(chosen)
    assert frequencies[0] == 0 and abs(frequencies[1] - 0.5) < 0.08 and abs(frequencies[2] - 0.5) < 0.08


def test_a_prompted_model_mixes_region_and_softmax_tasks(run_cli, region_dataset, kidney_dataset, tmp_path):
    from uniseg_cli.data.training_cache import preprocess_datasets

    prep = tmp_path / "prep"
    preprocess_datasets([f"kidney_slabs={kidney_dataset}", f"kidney_regions={region_dataset}"], prep, workers=1,
                        progress=False, target_spacing=(6.0, 6.0, 6.0))
    out = tmp_path / "model"
    code, _, err = run_cli("train", prep, "-o", out, "--preset", "small", "--epochs", "1", "--batches-per-task", "2",
                           "--device", "cpu", "-j", "0", "-q")
    assert code == 0, err
    code, stdout, err = run_cli("predict", CT, "-t", "kidney_slabs,kidney_regions", "-m", out, "-o", tmp_path / "p",
                                "--no-tta", "--split", "--json", "-q")
    assert code == 0, err
    record = json.loads(stdout)
    labels = {(r["task"], r["value"], r["name"]) for r in record["labels"]}
    assert labels == {("kidney_slabs", 1, "kidney"), ("kidney_regions", 1, "kidneys without left kidney"),
                      ("kidney_regions", 2, "left kidney")}
    assert [(r["task"], r["name"], r["values"]) for r in record["regions"]] == [
        ("kidney_regions", "kidneys", [1, 2]), ("kidney_regions", "left kidney", [2])]
