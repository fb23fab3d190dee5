"""`uniseg preprocess`: dataset formats, integrity errors, the label round-trip, resumability."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import CT, DATA, write_kidney_dataset


def _copy(dataset, tmp_path):
    target = tmp_path / dataset.name
    shutil.copytree(dataset, target)
    return target


def _one_error(run_cli, *args):
    code, out, err = run_cli("preprocess", *args)
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert code == 1, err
    assert len(lines) == 1, err
    return lines[0]


def test_preprocess_writes_arrays_properties_and_fingerprint(run_cli, kidney_dataset, tmp_path):
    out = tmp_path / "prep"
    code, _, err = run_cli("preprocess", "-d", f"kidney_slabs={kidney_dataset}", "-o", out, "-j", "2", "-q")
    assert code == 0, err
    plan = json.loads((out / "plan.json").read_text())
    assert [t["task"]["key"] for t in plan["tasks"]] == ["kidney_slabs"]
    assert plan["tasks"][0]["task"]["target_spacing"] == [3.0, 3.0, 3.0]   # the dataset's median spacing
    assert plan["tasks"][0]["task"]["channels"][0]["normalization"] == "ct"
    folder = out / "kidney_slabs"
    image = np.load(folder / "ct1.npy", mmap_mode="r")
    seg = np.load(folder / "ct1_seg.npy", mmap_mode="r")
    assert image.dtype == np.float32 and seg.dtype == np.uint8 and image.shape[1:] == seg.shape
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0       # CT window → [0, 1]
    props = json.loads((folder / "ct1.json").read_text())
    locations = np.asarray(props["class_locations"]["1"])
    assert len(locations) > 0 and np.all(np.asarray(seg)[tuple(locations.T)] == 1)
    fingerprint = json.loads((folder / "fingerprint.json").read_text())
    assert fingerprint["cases"] == 3 and fingerprint["class_voxels"]["kidney"] > 0
    assert -200 < fingerprint["intensity"][0]["mean"] < 300              # kidney HU
    assert not list(out.rglob("*.partial*"))


def test_image_is_what_predict_feeds_the_network(kidney_prep):
    """One pre-processing path: the training array equals predict's network input for the same file."""
    from uniseg_cli.data.preprocessing import preprocess
    from uniseg_cli.data.training_cache import read_plan
    from uniseg_cli.io.images import read_channels

    data = read_plan(kidney_prep)[0]
    props = data.properties("ct2")
    raw, geometry = read_channels([props["channels"][0]])
    expected, _ = preprocess(raw, geometry.spacing, geometry.array_axis_world(), data.task.channels,
                             data.task.target_spacing)
    np.testing.assert_array_equal(np.asarray(data.image("ct2")), expected.numpy())


def test_label_round_trip_through_registry_spacing(ct_volume):
    """Pre-process labels to the kidney task's 3×1.5×1.5 mm grid and invert it: the map comes back."""
    import torch

    from uniseg_cli.data.preprocessing import labels_from_probabilities, preprocess, preprocess_labels, uncrop
    from uniseg_cli.tasks import resolve_task

    seg = np.asarray(nib.load(DATA / "example_seg_fast_force_split.nii.gz").dataobj).transpose(2, 1, 0)
    classes = np.zeros(seg.shape, np.uint8)
    for value, label in ((2, 1), (3, 1), (1, 2), (5, 3)):   # kidneys, spleen, liver
        classes[seg == value] = label
    task = resolve_task("kidney")
    _, info = preprocess(ct_volume[None], (3.0, 3.0, 3.0), (2, 1, 0), task.channels, task.target_spacing)
    labels = preprocess_labels(classes, info)
    assert labels.shape == tuple(int(round(s * 3.0 / t)) for s, t in zip(info.cropped_shape, task.target_spacing))
    onehot = torch.nn.functional.one_hot(torch.from_numpy(labels).long(), 4).permute(3, 0, 1, 2).float()
    back = uncrop(labels_from_probabilities(onehot, info)[0].numpy(), info)
    for label in (1, 2, 3):
        a, b = back == label, classes == label
        assert 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)) > 0.97


def test_msd_format_with_4d_images(run_cli, tmp_path):
    """The Decathlon layout: training list, 4-D images whose last axis holds the channels."""
    ct = nib.load(CT)
    image = np.asarray(ct.dataobj)[:, :, 70:110].astype(np.float32)   # through the spleen (slices 82-111)
    seg = np.asarray(nib.load(DATA / "example_seg_fast_force_split.nii.gz").dataobj)[:, :, 70:110]
    root = tmp_path / "Task99_SpleenPair"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    mr_like = np.clip(image + 1000, 0, None) / 2   # a second, non-CT channel on the same grid
    nib.save(nib.Nifti1Image(np.stack([image, mr_like], axis=-1), ct.affine), root / "imagesTr/spl_1.nii.gz")
    nib.save(nib.Nifti1Image((seg == 1).astype(np.uint8), ct.affine), root / "labelsTr/spl_1.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "name": "Spleen", "modality": {"0": "CT", "1": "T2"}, "labels": {"0": "background", "1": "spleen"},
        "training": [{"image": "./imagesTr/spl_1.nii.gz", "label": "./labelsTr/spl_1.nii.gz"}]}))
    code, _, err = run_cli("preprocess", "-d", str(root), "-o", tmp_path / "prep", "-q")
    assert code == 0, err
    task = json.loads((tmp_path / "prep/plan.json").read_text())["tasks"][0]["task"]
    assert task["key"] == "spleenpair" and task["labels"] == ["spleen"]
    assert [c["modality"] for c in task["channels"]] == ["CT", "MR"]
    assert np.load(tmp_path / "prep/spleenpair/spl_1.npy").shape[0] == 2


def test_known_task_and_label_order(run_cli, kidney_dataset, tmp_path):
    """``kidney=`` takes the registry task (its spacing and classes); labels map in dataset.json order."""
    root = _copy(kidney_dataset, tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "kidney": 1, "kidney tumour": 2}
    (root / "dataset.json").write_text(json.dumps(meta))
    code, _, err = run_cli("preprocess", "-d", f"kidn={root}", "-o", tmp_path / "prep", "-q",
                           "--target-spacing", "6,6,6")
    assert code == 0, err
    task = json.loads((tmp_path / "prep/plan.json").read_text())["tasks"][0]["task"]
    assert task["key"] == "kidney" and task["labels"] == ["kidney", "kidney tumour"]
    assert task["target_spacing"] == [6.0, 6.0, 6.0]


def test_interrupted_run_resumes_and_skips_finished_cases(kidney_dataset, tmp_path):
    from uniseg_cli.data.training_cache import preprocess_datasets, read_plan

    out = tmp_path / "prep"
    preprocess_datasets([f"kidney_slabs={kidney_dataset}"], out, workers=1, progress=False)
    first = (out / "kidney_slabs/ct0.npy").stat().st_mtime_ns
    (out / "kidney_slabs/ct1.json").unlink()          # as if killed while writing case ct1
    with pytest.raises(Exception, match="not pre-processed yet"):
        read_plan(out)
    preprocess_datasets([f"kidney_slabs={kidney_dataset}"], out, workers=1, progress=False)
    assert (out / "kidney_slabs/ct0.npy").stat().st_mtime_ns == first
    assert [t.cases for t in read_plan(out)] == [("ct0", "ct1", "ct2")]


# ---------------------------------------------------------------------------------- integrity
def test_undeclared_label_value(run_cli, kidney_dataset, tmp_path):
    root = _copy(kidney_dataset, tmp_path)
    label = nib.load(root / "labelsTr/ct1.nii.gz")
    data = np.asarray(label.dataobj).copy()
    data[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(data, label.affine), root / "labelsTr/ct1.nii.gz")
    line = _one_error(run_cli, "-d", str(root), "-o", tmp_path / "prep")
    assert "labelsTr/ct1.nii.gz" in line and "[3] are not declared" in line
    assert not (tmp_path / "prep").exists()


def test_missing_image(run_cli, kidney_dataset, tmp_path):
    root = _copy(kidney_dataset, tmp_path)
    (root / "imagesTr/ct2_0000.nii.gz").unlink()
    line = _one_error(run_cli, "-d", str(root), "-o", tmp_path / "prep")
    assert "imagesTr/ct2_0000.nii.gz: missing (case ct2)" in line


def test_an_image_without_its_label_or_a_wrong_case_count_stops_before_any_work(run_cli, kidney_dataset, tmp_path,
                                                                               monkeypatch):
    """Cases are listed from labelsTr: a lost label file used to drop its image silently (exit 0)."""
    from uniseg_cli.data import datasets

    read = []
    monkeypatch.setattr(datasets, "read_channels", lambda *a, **k: read.append(a) or pytest.fail("read a file"))
    root = _copy(kidney_dataset, tmp_path)
    (root / "labelsTr/ct1.nii.gz").unlink()
    line = _one_error(run_cli, "-d", str(root), "-o", tmp_path / "prep")
    assert line == (f"Error: {root / 'imagesTr/ct1_0000.nii.gz'}: no label file {root / 'labelsTr/ct1.nii.gz'} "
                    "(case ct1)")
    (root / "imagesTr/ct1_0000.nii.gz").unlink()   # a consistent dataset of two cases, but numTraining says 3
    assert _one_error(run_cli, "-d", str(root), "-o", tmp_path / "prep") == (
        f"Error: {root / 'dataset.json'}: numTraining is 3, but the dataset holds 2 labelled case(s)")
    shutil.copy(root / "imagesTr/ct0_0000.nii.gz", root / "imagesTr/ct0_0001.nii.gz")
    assert _one_error(run_cli, "-d", str(root), "-o", tmp_path / "prep") == (
        f"Error: {root / 'imagesTr/ct0_0001.nii.gz'}: channel 0001, but dataset.json declares 1 channel(s)")
    assert read == [] and not (tmp_path / "prep").exists()


def test_label_grid_mismatch(run_cli, kidney_dataset, tmp_path):
    root = _copy(kidney_dataset, tmp_path)
    label = nib.load(root / "labelsTr/ct0.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj)[:, :, :50], label.affine), root / "labelsTr/ct0.nii.gz")
    line = _one_error(run_cli, "-d", str(root), "-o", tmp_path / "prep")
    assert "labelsTr/ct0.nii.gz: not on its image's grid: it is 122×101×50 voxels at 3×3×3 mm, not " in line


def test_nan_and_unreadable_and_channel_count(run_cli, kidney_dataset, tmp_path):
    root = _copy(kidney_dataset, tmp_path)
    image = nib.load(root / "imagesTr/ct0_0000.nii.gz")
    data = np.asarray(image.dataobj).astype(np.float32)
    data[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), root / "imagesTr/ct0_0000.nii.gz")
    assert "ct0_0000.nii.gz: contains NaN values" in _one_error(run_cli, "-d", str(root), "-o", tmp_path / "p")

    (root / "imagesTr/ct0_0000.nii.gz").write_bytes(b"not an image")
    assert "ct0_0000.nii.gz: cannot read the image" in _one_error(run_cli, "-d", str(root), "-o", tmp_path / "p")

    other = write_kidney_dataset(tmp_path / "two_channels", slabs=((60, 100),))   # through the kidneys
    meta = json.loads((other / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT", "1": "PET"}
    (other / "dataset.json").write_text(json.dumps(meta))
    ct0 = nib.load(other / "imagesTr/ct0_0000.nii.gz")
    pet = np.clip(np.asarray(ct0.dataobj, dtype=np.float32) + 100, 0, 400) / 80
    nib.save(nib.Nifti1Image(pet, ct0.affine), other / "imagesTr/ct0_0001.nii.gz")
    line = _one_error(run_cli, "-d", f"kidney={other}", "-o", tmp_path / "p")
    assert "task 'kidney' takes 1 channel(s)" in line and "the dataset has 2" in line


def test_dataset_json_errors(run_cli, kidney_dataset, tmp_path):
    root = _copy(kidney_dataset, tmp_path)
    (root / "dataset.json").unlink()
    assert "dataset.json: missing" in _one_error(run_cli, "-d", str(root), "-o", tmp_path / "p")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                   "labels": {"background": 0, "kidney": [1, 2]}}))
    assert "region" in _one_error(run_cli, "-d", str(root), "-o", tmp_path / "p")


def test_known_tasks_can_come_from_a_model(run_cli, kidney_dataset, tmp_path):
    """`--model`: the model's own tasks are the known ones (the demo model's kidney is at 3 mm)."""
    code, _, err = run_cli("preprocess", "-d", f"kidney={kidney_dataset}", "-o", tmp_path / "prep", "-m", "uniseg-demo", "-q")
    assert code == 0, err
    task = json.loads((tmp_path / "prep/plan.json").read_text())["tasks"][0]["task"]
    assert task["key"] == "kidney" and task["target_spacing"] == [3.0, 3.0, 3.0]


def test_memory_and_a_corrupt_plan_are_named_for_what_they_are(run_cli, kidney_dataset, tmp_path, monkeypatch):
    from uniseg_cli.io import images
    from uniseg_cli.io.images import ImageError, read_image

    def no_memory(path):
        raise MemoryError()

    with monkeypatch.context() as patched:
        patched.setattr(images, "_read_nifti", no_memory)
        with pytest.raises(ImageError, match=r"ct0_0000.nii.gz: not enough memory to read the image$"):
            read_image(kidney_dataset / "imagesTr/ct0_0000.nii.gz")    # was: "cannot read the image (MemoryError)"

    out = tmp_path / "p"
    out.mkdir()
    (out / "plan.json").write_text("{ truncated")
    line = _one_error(run_cli, "-d", f"kidney={kidney_dataset}", "-o", out)
    assert f"{out / 'plan.json'}: unreadable (" in line and "remove" in line   # was: "other datasets or tasks"


def test_a_truncated_cached_array_is_named_before_training_and_redone_by_preprocess(run_cli, kidney_dataset,
                                                                                    tmp_path):
    """A truncated .npy in the cache failed training mid-way (after minutes, leaving a partial model folder)."""
    import json

    prep = tmp_path / "prep"
    assert run_cli("preprocess", "-d", f"kidney_slabs={kidney_dataset}", "-o", prep, "-j", "1")[0] == 0
    array = next((prep / "kidney_slabs").glob("*_seg.npy"))
    whole = array.read_bytes()
    array.write_bytes(whole[: len(whole) // 3])
    code, _, err = run_cli("train", prep, "-o", tmp_path / "model", "--epochs", "1", "--device", "cpu")
    assert code == 1 and f"{array}: ends after {len(whole) // 3} of {len(whole)} bytes (truncated)" in err
    assert "rerun `uniseg preprocess` with the same datasets" in err and not (tmp_path / "model").exists()
    assert run_cli("preprocess", "-d", f"kidney_slabs={kidney_dataset}", "-o", prep, "-j", "1")[0] == 0
    assert array.read_bytes() == whole and json.loads((prep / "plan.json").read_text())["tasks"]
