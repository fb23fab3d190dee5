"""`uniseg predict` end to end on real scans: geometry, batches, JSON, errors."""

from __future__ import annotations

import io
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import CT, DICOM, SHARED_DATA, write_pet_like


def test_kidney_on_the_real_ct_keeps_the_input_geometry_exactly(run_cli, small_model_dir, tmp_path):
    out = tmp_path / "kidney.nii.gz"
    code, stdout, err = run_cli("predict", CT, "--task", "kidn", "-m", small_model_dir, "-o", out, "--json",
                                "--no-tta", "--step", "1", "--device", "cpu")
    assert code == 0, err
    result = json.loads(stdout)
    source, written = nib.load(CT), nib.load(out)
    assert written.shape == source.shape and np.array_equal(written.affine, source.affine)
    for field in ("qform_code", "sform_code", "pixdim", "xyzt_units", "quatern_b", "srow_x", "srow_z"):
        assert np.array_equal(written.header[field], source.header[field]), field
    assert written.get_data_dtype() == np.uint8
    labels = np.asarray(written.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2}
    assert result["task"] == "kidney" and result["output"] == str(out) and result["device"] == "cpu"
    assert [(r["value"], r["name"]) for r in result["labels"]] == [(1, "kidney"), (2, "kidney tumour")]
    for entry in result["labels"]:
        assert entry["voxels"] == int((labels == entry["value"]).sum())
        assert entry["volume_ml"] == pytest.approx(entry["voxels"] * 27 / 1000, abs=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kidney.json", "kidney.nii.gz"]
    table = json.loads((tmp_path / "kidney.json").read_text())
    assert table["label_map"] == "kidney.nii.gz" and table["task"] == "kidney" and table["background"] == 0
    assert [(e["value"], e["name"], e["task"], e["colour"], e["type"]["value"]) for e in table["labels"]] == [
        (1, "kidney", "kidney", [46, 204, 113], "64033007"), (2, "kidney tumour", "kidney", [0, 255, 255], "108369006")]


@pytest.fixture(scope="module")
def scan_folder(tmp_path_factory):
    """Three real scans in three formats: the CT, a crop of it as NRRD, and its upper part as MetaImage."""
    folder = tmp_path_factory.mktemp("scans")
    shutil.copy(CT, folder / "a.nii.gz")
    image = sitk.ReadImage(str(CT))
    sitk.WriteImage(image[10:90, 20:80, 30:100], str(folder / "b.nrrd"))
    sitk.WriteImage(image[:, :, 60:], str(folder / "c.mha"))
    return folder


def test_a_folder_and_a_stdin_list_load_the_model_once(run_cli, coarse_model_dir, scan_folder, tmp_path,
                                                       monkeypatch):
    import uniseg_cli.inference.predictor as predictor

    loads = []
    original = predictor.load_model
    monkeypatch.setattr(predictor, "load_model", lambda *a, **k: loads.append(a) or original(*a, **k))
    code, stdout, err = run_cli("predict", scan_folder, "-t", "spleen", "-m", coarse_model_dir, "-o", tmp_path / "out",
                                "--json", "--no-tta")
    assert code == 0, err
    results = [json.loads(line) for line in stdout.splitlines()]
    assert [r["case"] for r in results] == ["a", "b", "c"] and len(loads) == 1
    for name in ("a", "b", "c"):
        ending = {"a": ".nii.gz", "b": ".nrrd", "c": ".mha"}[name]
        written = sitk.ReadImage(str(tmp_path / "out" / f"{name}_spleen.nii.gz"))
        source = sitk.ReadImage(str(scan_folder / f"{name}{ending}"))
        assert written.GetSize() == source.GetSize()
        np.testing.assert_allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(written.GetDirection(), source.GetDirection(), atol=1e-6)
        np.testing.assert_allclose(written.GetSpacing(), source.GetSpacing(), atol=1e-6)

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{scan_folder / 'b.nrrd'}\n\n{scan_folder / 'c.mha'}\n"))
    code, stdout, _ = run_cli("predict", "-", "-t", "6", "-m", coarse_model_dir, "-o", tmp_path / "stdin", "--json",
                              "--no-tta")
    assert code == 0 and [json.loads(line)["case"] for line in stdout.splitlines()] == ["b", "c"]
    assert len(loads) == 2


def test_other_formats_are_written_with_their_geometry(run_cli, coarse_model_dir, scan_folder, tmp_path):
    out = tmp_path / "b_liver.nrrd"
    code, _, err = run_cli("predict", scan_folder / "b.nrrd", "-t", "liver", "-m", coarse_model_dir, "-o", out, "--no-tta")
    assert code == 0, err
    written, source = sitk.ReadImage(str(out)), sitk.ReadImage(str(scan_folder / "b.nrrd"))
    assert written.GetSize() == source.GetSize() and written.GetPixelID() == sitk.sitkUInt8
    assert written.GetOrigin() == source.GetOrigin() and written.GetDirection() == source.GetDirection()


@pytest.mark.skipif(not (SHARED_DATA / "brain_tcga_4ch").is_dir(), reason="needs ../shared/data/brain_tcga_4ch")
def test_four_channel_brain_case(run_cli, coarse_model_dir, tmp_path):
    raw = SHARED_DATA / "brain_tcga_4ch" / "TCGA-DU-7294" / "TCGA-DU-7294_brainles" / "raw_bet"
    channels = ",".join(str(raw / f"TCGA-DU-7294_{c}_bet.nii.gz") for c in ("t1", "t1c", "t2", "fla"))
    code, stdout, err = run_cli("predict", channels, "-t", "brats", "-m", coarse_model_dir, "-o", tmp_path, "--json",
                                "--no-tta")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["case"] == "TCGA-DU-7294_t1_bet" and len(result["inputs"]) == 4
    assert [r["name"] for r in result["labels"]] == ["edema", "non-enhancing tumour", "enhancing tumour"]
    written = nib.load(tmp_path / "TCGA-DU-7294_t1_bet_brain_tumor.nii.gz")
    assert written.shape == (240, 240, 155) and np.array_equal(written.affine, nib.load(raw / "TCGA-DU-7294_t1_bet.nii.gz").affine)


def test_nnunet_channel_naming_groups_files(run_cli, coarse_model_dir, tmp_path):
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    shutil.copy(CT, folder / "case1_0000.nii.gz")
    write_pet_like(folder / "case1_0001.nii.gz")
    code, stdout, err = run_cli("predict", folder, "-t", "pet_lesion", "-m", coarse_model_dir, "-o", tmp_path / "out",
                                "--json", "--no-tta")
    assert code == 0, err
    assert json.loads(stdout)["inputs"] == [str(folder / "case1_0000.nii.gz"), str(folder / "case1_0001.nii.gz")]
    assert (tmp_path / "out" / "case1_pet_lesion.nii.gz").is_file()


def test_all_tasks_merge_into_one_map(run_cli, coarse_model_dir, tmp_path):
    code, stdout, err = run_cli("predict", CT, "-t", "all", "-m", coarse_model_dir, "-o", tmp_path, "--json", "--no-tta")
    assert code == 0, err
    result = json.loads(stdout)
    assert [r["value"] for r in result["labels"]] == list(range(1, 13))   # the CT tasks: liver 1-2 … vertebrae 12
    vertebrae = result["labels"][11]
    assert vertebrae == {"value": 12, "name": "vertebrae", "task": "vertebrae", "voxels": vertebrae["voxels"],
                         "volume_ml": vertebrae["volume_ml"], "flags": vertebrae["flags"]}
    labels = np.asarray(nib.load(tmp_path / "example_ct_all.nii.gz").dataobj)
    assert labels.max() <= 12


def test_probabilities_shards_and_resume(run_cli, coarse_model_dir, scan_folder, tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = run_cli("predict", scan_folder, "-t", "kidney", "-m", coarse_model_dir, "-o", out, "--no-tta",
                              "--shard", "1/2", "--json", "--save-probabilities", "npz")
    assert code == 0 and [json.loads(line)["case"] for line in stdout.splitlines()] == ["b"]
    probabilities = np.load(out / "b_kidney_probabilities.npz")["kidney"]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "b_kidney.nii.gz")))
    assert probabilities.dtype == np.float16 and probabilities.shape == (3, *labels.shape)
    # float16 rounding may turn a near-tie the other way; everything else agrees
    assert (probabilities.astype(np.float32).argmax(0) == labels).mean() > 0.999
    code, stdout, _ = run_cli("predict", scan_folder, "-t", "kidney", "-m", coarse_model_dir, "-o", out, "--no-tta",
                              "--skip-existing", "--json")
    results = [json.loads(line) for line in stdout.splitlines()]
    assert code == 0 and [(r["case"], r.get("skipped", False)) for r in results] == [
        ("a", False), ("b", True), ("c", False)]
    assert sorted(results[1]) == ["case", "flags", "inputs", "output", "skipped", "task"]  # flags: as recorded


def test_python_api_segments_an_array(coarse_model_dir, ct_volume):
    from uniseg_cli.inference.predictor import Segmenter
    from uniseg_cli.inference.sliding_window import WindowOptions

    segmenter = Segmenter(coarse_model_dir, device="cpu", window=WindowOptions(mirror=False))
    prediction = segmenter.predict_array(ct_volume, (3.0, 3.0, 3.0), "kidney")
    assert prediction.labels.shape == ct_volume.shape and prediction.labels.dtype == np.uint8
    assert [label.name for label in prediction.legend] == ["kidney", "kidney tumour"]


def test_python_api_segments_files(coarse_model_dir, scan_folder, tmp_path):
    from uniseg_cli.inference.predictor import Segmenter
    from uniseg_cli.inference.sliding_window import WindowOptions

    segmenter = Segmenter(coarse_model_dir, device="cpu", window=WindowOptions(mirror=False))
    one = segmenter.predict_file(scan_folder / "b.nrrd", "sple", tmp_path / "b.nii.gz")
    assert one.task == "spleen" and (tmp_path / "b.nii.gz").is_file() and one.error is None
    many = segmenter.predict_files([scan_folder / "a.nii.gz", scan_folder / "c.mha"], "6", tmp_path / "many")
    assert [r.output for r in many] == [str(tmp_path / "many" / "a_spleen.nii.gz"), str(tmp_path / "many" / "c_spleen.nii.gz")]


def test_dicom_series_folder(run_cli, coarse_model_dir, tmp_path):
    series = DICOM
    code, stdout, err = run_cli("predict", series, "-t", "liver", "-m", coarse_model_dir, "-o", tmp_path, "--json",
                                "--no-tta", "--save-probabilities", "nifti")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["case"] == "example_ct_dicom" and result["inputs"] == [str(series)]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    source = reader.Execute()
    written = sitk.ReadImage(str(tmp_path / "example_ct_dicom_liver.nii.gz"))
    assert written.GetSize() == source.GetSize() == (512, 512, 20)
    np.testing.assert_allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(written.GetDirection(), source.GetDirection(), atol=1e-6)
    probabilities = sitk.ReadImage(str(tmp_path / "example_ct_dicom_liver_probabilities.nii.gz"))
    assert probabilities.GetNumberOfComponentsPerPixel() == 3 and probabilities.GetSize() == source.GetSize()


def test_one_output_file_for_several_cases_is_a_usage_error(run_cli, coarse_model_dir, scan_folder, tmp_path):
    code, _, err = run_cli("predict", scan_folder, "-t", "kidney", "-m", coarse_model_dir, "-o", tmp_path / "x.nii.gz")
    assert code == 2 and "-o names one file, but there are several cases; give a folder" in err
    assert list(tmp_path.iterdir()) == []


def test_all_keeps_the_merged_numbering_when_one_task_fits(run_cli, coarse_model_dir, tmp_path):
    # Two channels: only the CT+PET lesion task fits; its label is 17 in the merged map, as in docs/pipeline.md §2.
    pet = write_pet_like(tmp_path / "pet.nii.gz")
    code, stdout, err = run_cli("predict", f"{CT},{pet}", "-t", "all", "-m", coarse_model_dir, "-o", tmp_path,
                                "--json", "--no-tta")
    assert code == 0, err
    assert [(r["value"], r["task"]) for r in json.loads(stdout)["labels"]] == [(17, "pet_lesion")]
    assert set(np.unique(np.asarray(nib.load(tmp_path / "example_ct_all.nii.gz").dataobj))) <= {0, 17}


def test_a_sagittally_stored_scan_gives_the_same_labels_in_its_own_geometry(run_cli, coarse_model_dir, tmp_path):
    # The same CT stored with its array axes permuted (x, y, z) -> (y, z, x), affine columns permuted to
    # match: the same voxels in space. uniseg reorients to axial order by permutation, so the label maps
    # must be the same voxels too, each written in its input's own geometry.
    image = nib.load(CT)
    data = np.asarray(image.dataobj)
    permuted = nib.Nifti1Image(np.ascontiguousarray(data.transpose(1, 2, 0)),
                               image.affine[:, [1, 2, 0, 3]], image.header)
    nib.save(permuted, tmp_path / "sagittal.nii.gz")
    code, _, err = run_cli("predict", CT, tmp_path / "sagittal.nii.gz", "-t", "liver", "-m", coarse_model_dir,
                           "-o", tmp_path / "out", "--no-tta")
    assert code == 0, err
    axial = np.asarray(nib.load(tmp_path / "out" / "example_ct_liver.nii.gz").dataobj)
    sagittal = nib.load(tmp_path / "out" / "sagittal_liver.nii.gz")
    assert np.array_equal(sagittal.affine, permuted.affine) and sagittal.shape == permuted.shape
    assert np.array_equal(np.asarray(sagittal.dataobj), axial.transpose(1, 2, 0))


def test_max_memory_refuses_what_cannot_fit_and_slabs_the_export(run_cli, small_model_dir, ct_volume, tmp_path):
    """The kidney task at 3×1.5×1.5 mm: about 45 MiB of input and accumulators for the real CT."""
    from uniseg_cli.inference.predictor import Segmenter
    from uniseg_cli.inference.runtime import parse_size
    from uniseg_cli.inference.sliding_window import WindowOptions

    assert parse_size("4G") == 4 * 2**30 and parse_size("512m") == 512 * 2**20 and parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("1000") == 1000
    code, _, err = run_cli("predict", CT, "-t", "kidney", "-m", small_model_dir, "-o", tmp_path / "a.nii.gz",
                           "--no-tta", "--max-memory", "20M")
    assert code == 1 and "more than --max-memory 0.02 GiB" in err and "probabilities of 3 classes" in err
    assert not (tmp_path / "a.nii.gz").exists()
    code, _, err = run_cli("predict", CT, "-t", "kidney", "-m", small_model_dir, "-o", tmp_path, "--max-memory", "lots")
    assert code == 2 and "--max-memory must be a size like 4G" in err

    window = WindowOptions(mirror=False, step=1.0)
    free = Segmenter(small_model_dir, device="cpu", window=window).predict_array(ct_volume, (3, 3, 3), "kidney")
    inputs = Segmenter(small_model_dir, device="cpu", window=window).prepare_array(ct_volume, (3, 3, 3), "kidney")
    group, x, info = inputs.groups[0]
    needed = x.nbytes + 4 * int(np.prod([max(s, p) for s, p in zip(x.shape[1:], (32, 64, 64))])) * 4 + 2 * ct_volume.size
    tight = Segmenter(small_model_dir, device="cpu", window=window, max_memory=needed + 3 * 101 * 122 * 4 * 2)
    assert tight._memory_budget(x, group, info, inputs.shape) == 3 * 101 * 122 * 4 * 2   # two rows per slab
    np.testing.assert_array_equal(tight.run(inputs).labels, free.labels)


def test_task_all_lets_the_later_task_win_whatever_the_spacing_groups(ct_volume):
    # kidney and spleen share a spacing, vertebrae (between them in task order) has its own: the groups
    # run kidney+spleen first and vertebrae last, but where spleen and vertebrae overlap spleen must win.
    import dataclasses

    import torch

    from uniseg_cli.config import small_config
    from uniseg_cli.inference.predictor import Segmenter
    from uniseg_cli.inference.sliding_window import WindowOptions
    from uniseg_cli.model.network import UniSeg
    from uniseg_cli.tasks import UPSTREAM_TASKS

    by_key = {t.key: t for t in UPSTREAM_TASKS}
    tasks = tuple(dataclasses.replace(by_key[key], id=i, target_spacing=spacing) for i, (key, spacing) in
                  enumerate([("kidney", (8.0, 4.0, 4.0)), ("vertebrae", (8.0, 6.0, 6.0)), ("spleen", (8.0, 4.0, 4.0))]))
    torch.manual_seed(3)
    # fp32: which labels a random network gives is a near-tie that reduced precision moves
    segmenter = Segmenter(UniSeg(small_config(tasks=tasks)), device="cpu",
                          window=WindowOptions(mirror=False, precision="fp32"))
    spacing = (3.0, 3.0, 3.0)
    merged = segmenter.predict_array(ct_volume, spacing, "all").labels
    expected = np.zeros_like(merged)
    offset = 0
    for task in tasks:                                    # the documented rule, written out: in task order,
        labels = segmenter.predict_array(ct_volume, spacing, task.key).labels   # a labelled voxel overwrites
        expected[labels > 0] = labels[labels > 0] + offset
        offset += len(task.labels)
    spleen, vertebrae = expected == 4, np.isin(expected, [3])
    overlap = (segmenter.predict_array(ct_volume, spacing, "vertebrae").labels > 0) & spleen
    assert overlap.sum() > 100                           # the case the rule is about does occur here
    assert np.array_equal(merged, expected)
    assert set(np.unique(merged)) - {0} == {1, 2, 3, 4} and vertebrae.any()
