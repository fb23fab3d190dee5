"""Bad input: one clear line naming the file, the right exit code, and no partial output."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import CT, DICOM


def _outputs(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def out(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def test_missing_file(run_cli, coarse_model_dir, tmp_path, out):
    missing = tmp_path / "nope.nii.gz"
    code, _, err = run_cli("predict", missing, "-t", "kidney", "-m", coarse_model_dir, "-o", out)
    assert code == 1 and _one_error_line(err) == f"Error: {missing}: no such file"
    assert _outputs(out) == []


def test_corrupt_file(run_cli, coarse_model_dir, tmp_path, out):
    corrupt = tmp_path / "broken.nii.gz"
    corrupt.write_bytes(CT.read_bytes()[:5000])            # too short to hold its voxels even at gzip's best ratio
    code, _, err = run_cli("predict", corrupt, "-t", "kidney", "-m", coarse_model_dir, "-o", out)
    assert code == 1 and _one_error_line(err).startswith(f"Error: {corrupt}: its header claims 122×101×112 voxels "
                                                         "(5.52 MB) but its 5 kB of compressed data cannot hold them")
    corrupt.write_bytes(CT.read_bytes()[:50000])           # could hold them: the reader finds the end
    code, _, err = run_cli("predict", corrupt, "-t", "kidney", "-m", coarse_model_dir, "-o", out)
    assert code == 1 and _one_error_line(err).startswith(f"Error: {corrupt}: cannot read the image (")
    assert _outputs(out) == []


def test_2d_image(run_cli, coarse_model_dir, tmp_path, out):
    flat = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64), np.int16), np.eye(4)), flat)
    code, _, err = run_cli("predict", flat, "-t", "kidney", "-m", coarse_model_dir, "-o", out)
    assert code == 1 and "uniseg segments 3-D volumes" in _one_error_line(err) and str(flat) in err


def test_wrong_channel_count_and_task_that_does_not_fit(run_cli, coarse_model_dir, out):
    code, _, err = run_cli("predict", f"{CT},{CT}", "-t", "kidney", "-m", coarse_model_dir, "-o", out)
    assert code == 1
    assert _one_error_line(err) == f"Error: {CT}: task 'kidney' takes 1 channel(s) (CT); the case has 2"
    code, _, err = run_cli("predict", CT, "-t", "brain_tumor", "-m", coarse_model_dir, "-o", out)
    assert code == 1
    assert _one_error_line(err) == f"Error: {CT}: task 'brain_tumor' takes 4 channel(s) (T1, T1ce, T2, FLAIR); the case has 1"
    assert _outputs(out) == []


def test_channels_on_different_grids(run_cli, coarse_model_dir, tmp_path, out):
    image = nib.load(CT)
    cropped = tmp_path / "pet.nii.gz"
    nib.save(image.slicer[:, :, 10:], cropped)
    code, _, err = run_cli("predict", f"{CT},{cropped}", "-t", "pet", "-m", coarse_model_dir, "-o", out)
    assert code == 1
    assert _one_error_line(err) == (f"Error: channels are on different grids: {cropped} is 122×101×102 voxels at "
                                    f"3×3×3 mm, not 122×101×112 voxels at 3×3×3 mm like {CT}")


@pytest.mark.parametrize("change, words", [
    (lambda a: a @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 5], [0, 0, 0, 1]]), "has its origin at"),
    (lambda a: a @ np.diag([-1, 1, 1, 1]), "has the orientation"),  # the first axis reversed, same origin
])
def test_grids_differing_only_in_origin_or_orientation_say_so(run_cli, coarse_model_dir, tmp_path, out, change, words):
    image = nib.load(CT)
    moved = tmp_path / "moved.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), change(image.affine)), moved)
    code, _, err = run_cli("predict", f"{CT},{moved}", "-t", "pet", "-m", coarse_model_dir, "-o", out)
    line = _one_error_line(err)
    assert code == 1 and f"{moved} {words}" in line and f"like {CT} (both 122×101×112 voxels at 3×3×3 mm" in line
    before, _, after = line.partition(", not ")
    assert before.split(words)[1].strip() != after.split(" like ")[0].strip()  # the two values shown differ


def _series_without(tmp_path, *dropped):
    """The shipped DICOM series copied without the slices at the given positions (in slice order)."""
    import SimpleITK as sitk

    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(DICOM))
    folder = tmp_path / "series"
    folder.mkdir()
    for i, name in enumerate(files):
        if i not in dropped:
            shutil.copy(name, folder)
    return folder, files


def test_a_dicom_series_with_a_missing_slice_is_refused_unless_allowed(run_cli, coarse_model_dir, tmp_path, out):
    folder, files = _series_without(tmp_path, 7)
    code, _, err = run_cli("predict", folder, "-t", "liver", "-m", coarse_model_dir, "-o", out, "--no-tta")
    line = _one_error_line(err)
    assert code == 1 and line.startswith(f"Error: {folder}: 1 slice(s) missing: 4 mm between slice positions ")
    assert "the others are 2 mm apart; pass --allow-gaps" in line and _outputs(out) == []
    code, _, err = run_cli("-q", "predict", folder, "-t", "liver", "-m", coarse_model_dir, "-o", out, "--no-tta",
                           "--allow-gaps")
    assert code == 0 and "segmenting it anyway (--allow-gaps)" in err
    assert _outputs(out) == ["series_liver.json", "series_liver.nii.gz"]


def test_itk_warnings_never_reach_the_terminal(tmp_path, capfd):
    from uniseg_cli.io.images import read_image

    folder, _ = _series_without(tmp_path, 7)
    data, geometry = read_image(folder, allow_gaps=True)
    assert data.shape == (1, 19, 512, 512)
    assert "ImageSeriesReader" not in capfd.readouterr().err  # ITK writes to the process's stderr itself


def test_an_unreadable_dicom_slice_is_named(run_cli, coarse_model_dir, tmp_path, out):
    folder, files = _series_without(tmp_path)
    broken = folder / Path(files[5]).name
    broken.write_bytes(broken.read_bytes()[:200])
    code, _, err = run_cli("predict", folder, "-t", "liver", "-m", coarse_model_dir, "-o", out)
    line = _one_error_line(err)
    assert code == 1 and "1 slice(s) missing" in line and f"e.g. {broken.name}, are not readable" in line


def test_dicom_series_checks_name_duplicates_uneven_steps_and_mixed_orientations():
    from uniseg_cli.io.images import series_problem

    axial = "1\\0\\0\\0\\1\\0"
    def series(zs, orientations=None):
        return [(f"s{i}.dcm", f"0\\0\\{z}", (orientations or {}).get(i, axial)) for i, z in enumerate(zs)]
    assert series_problem(series([0, 2, 4, 6])) is None
    assert series_problem(series([0, 2, 4.005, 6])) is None  # rounding in the header
    assert series_problem(series([0, 2, 2, 4])) == "two slices at the same position 2 mm (s1.dcm, s2.dcm)"
    assert series_problem(series([0, 2, 5, 7, 9])).startswith("uneven slice spacing: 3 mm between slice positions 2 and 5")
    assert series_problem(series([0, 2, 4, 6], {2: "1\\0\\0\\0\\0.9\\0.43589"})) == \
        "mixed slice orientations (s0.dcm and s2.dcm differ)"
    tilted = [(f"s{i}.dcm", f"0\\{0.5 * i}\\{2 * i}", axial) for i in range(4)]
    assert series_problem(tilted).startswith("slices shifted within their plane by up to 1.5 mm")


def test_unknown_task_is_a_usage_error(run_cli, coarse_model_dir, out):
    code, _, err = run_cli("predict", CT, "-t", "kidny", "-m", coarse_model_dir, "-o", out)
    assert code == 2 and _one_error_line(err) == "Error: unknown task 'kidny'; did you mean 'kidney'?"


def test_output_equal_to_input_is_refused(run_cli, coarse_model_dir, tmp_path):
    scan = tmp_path / "scan.nii.gz"
    shutil.copy(CT, scan)
    before = scan.read_bytes()
    code, _, err = run_cli("predict", scan, "-t", "kidney", "-m", coarse_model_dir, "-o", scan)
    assert code == 2 and _one_error_line(err) == (f"Error: {scan}: the nifti label map of case 'scan' would overwrite "
                                                  f"the input {scan}; give another -o or format")
    assert scan.read_bytes() == before and _outputs(tmp_path) == ["scan.nii.gz"]


def test_unwritable_output_folder(run_cli, coarse_model_dir, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    code, _, err = run_cli("predict", CT, "-t", "kidney", "-m", coarse_model_dir, "-o", blocker / "out")
    assert code == 1 and _one_error_line(err).startswith(f"Error: {blocker / 'out'}: cannot create the output folder")
    code, _, err = run_cli("predict", CT, "-t", "kidney", "-m", coarse_model_dir, "-o", blocker / "k.nii.gz")
    assert code == 1 and _one_error_line(err) == f"Error: {blocker}: exists and is not a folder"


def test_a_failed_write_names_the_output_and_leaves_nothing(tmp_path):
    from uniseg_cli.errors import UnisegError
    from uniseg_cli.io.atomic import atomic_file

    target = tmp_path / "k.nii.gz"
    with pytest.raises(UnisegError, match=f"^{re.escape(str(target))}: cannot write \\(No space left on device\\)$"):
        with atomic_file(target, suffix=".nii.gz") as tmp:
            tmp.write_bytes(b"half")
            raise OSError(28, "No space left on device", str(tmp))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UnisegError, match=f"^{re.escape(str(tmp_path / 'gone' / 'k.nii.gz'))}: cannot write here"):
        with atomic_file(tmp_path / "gone" / "k.nii.gz"):
            pass


def test_some_cases_fail_others_are_written(run_cli, coarse_model_dir, tmp_path, out):
    import json

    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    code, stdout, err = run_cli("predict", CT, broken, "-t", "spleen", "-m", coarse_model_dir, "-o", out, "--json",
                                "--no-tta")
    assert code == 1
    results = {r["case"]: r for r in map(json.loads, stdout.splitlines())}
    assert list(results) == ["example_ct", "broken"]          # reported in input order
    assert "error" not in results["example_ct"] and results["broken"]["error"].startswith(f"{broken}: cannot read")
    assert sorted(results["broken"]) == ["case", "error", "inputs", "task"]  # no labels, time or device
    assert _outputs(out) == ["example_ct_spleen.json", "example_ct_spleen.nii.gz"]
    # A failure while the next case is prefetched does not disturb it, nor the order.
    shutil.copy(CT, tmp_path / "ct2.nii.gz")
    code, stdout, err = run_cli("predict", broken, CT, tmp_path / "ct2.nii.gz", "-t", "spleen", "-m",
                                coarse_model_dir, "-o", tmp_path / "again", "--json", "--no-tta")
    assert code == 1 and err.count("Error:") == 1
    assert [json.loads(line)["case"] for line in stdout.splitlines()] == ["broken", "example_ct", "ct2"]
    assert _outputs(tmp_path / "again") == ["ct2_spleen.json", "ct2_spleen.nii.gz", "example_ct_spleen.json", "example_ct_spleen.nii.gz"]


@pytest.mark.parametrize("args,message", [
    (["--shard", "2/2"], "--shard '2/2': expected I/N with 0 <= I < N, e.g. 0/4 (or auto)"),
    (["--save-probabilities", "csv"], "--save-probabilities must be npz or nifti, got 'csv'"),
    (["--modality", "PET"], "--modality must be CT or MR, got 'PET'"),
    (["--precision", "fp8"], "--precision must be one of auto, fast, fp32, bf16, bf16-checked, fp16, got 'fp8'"),
])
def test_bad_options_are_usage_errors(run_cli, coarse_model_dir, out, args, message):
    code, _, err = run_cli("predict", CT, "-t", "kidney", "-m", coarse_model_dir, "-o", out, *args)
    assert code == 2 and _one_error_line(err) == f"Error: {message}"


def test_ambiguous_channel_naming_is_refused(run_cli, coarse_model_dir, tmp_path, out):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(CT, folder / "case.nii.gz")
    shutil.copy(CT, folder / "case_0000.nii.gz")
    code, _, err = run_cli("predict", folder, "-t", "kidney", "-m", coarse_model_dir, "-o", out)
    assert code == 2 and "ambiguous beside" in _one_error_line(err)
    (folder / "case.nii.gz").unlink()
    shutil.copy(CT, folder / "case_0002.nii.gz")
    code, _, err = run_cli("predict", folder, "-t", "kidney", "-m", coarse_model_dir, "-o", out)
    assert code == 2 and "without gaps; found 0000, 0002" in _one_error_line(err)


def test_folder_without_scans(run_cli, coarse_model_dir, tmp_path, out):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no scans here")
    code, _, err = run_cli("predict", empty, "-t", "kidney", "-m", coarse_model_dir, "-o", out)
    assert code == 2 and _one_error_line(err) == (f"Error: {empty}: folder holds no scans (.nii.gz, .nii, .nrrd, "
                                                  ".mha, .mhd) and no DICOM series")


def _scaled(affine, factors):
    out = affine.copy()
    out[:3, :3] *= np.asarray(factors)       # columns = voxel axes i, j, k
    return out


@pytest.mark.parametrize("damage,message", [
    (lambda image: nib.Nifti1Image(np.asarray(image.dataobj), _scaled(image.affine, (1e6 / 3, 1e6 / 3, 1))),
     "voxel size 1e+06 × 1e+06 × 3 mm is outside 0.01–100 mm"),
    (lambda image: nib.Nifti1Image(np.asarray(image.dataobj), _scaled(image.affine, (1e-4 / 3, 1, 1))),
     "voxel size 0.0001 × 3 × 3 mm is outside 0.01–100 mm"),
    (lambda image: _with_zooms(image, (0.0, 3.0, 3.0)), "voxel size 1 × 3 × 3 mm disagrees with its affine's 3 × 3 × 3 mm"),
    (lambda image: _with_nan_origin(image), "orientation or origin holds NaN or infinite values"),
])
def test_a_broken_header_fails_its_case_and_the_batch_goes_on(run_cli, coarse_model_dir, tmp_path, damage, message):
    image = nib.load(CT)
    bad = tmp_path / "in" / "a_broken.nii.gz"
    bad.parent.mkdir()
    nib.save(damage(image), bad)
    shutil.copy(CT, tmp_path / "in" / "b_good.nii.gz")
    code, out, err = run_cli("predict", tmp_path / "in", "-t", "spleen", "-m", coarse_model_dir, "-o", tmp_path / "out",
                             "--no-tta", "--json")
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and [r["case"] for r in records] == ["a_broken", "b_good"]
    assert message in records[0]["error"] and f"Error: {bad}: " in err
    assert records[1]["labels"] and (tmp_path / "out" / "b_good_spleen.nii.gz").exists()
    assert not (tmp_path / "out" / "a_broken_spleen.nii.gz").exists() and "Traceback" not in err


def _with_zooms(image, zooms):
    broken = nib.Nifti1Image(np.asarray(image.dataobj), image.affine, image.header.copy())
    broken.header.set_zooms(zooms)        # pixdim 0: nibabel reads it back as 1 mm
    return broken


def _with_nan_origin(image):
    affine = image.affine.copy()
    affine[0, 3] = np.nan
    broken = nib.Nifti1Image(np.asarray(image.dataobj), None, image.header.copy())
    broken.header.set_qform(None, code=0)
    broken.header["sform_code"] = 1
    for row, name in enumerate(("srow_x", "srow_y", "srow_z")):
        broken.header[name] = affine[row]
    return broken


def test_an_empty_shard_is_not_an_error_and_max_memory_must_be_positive(run_cli, coarse_model_dir, tmp_path):
    code, out, err = run_cli("predict", CT, "-t", "spleen", "-m", coarse_model_dir, "-o", tmp_path / "o",
                             "--shard", "1/2", "--json")           # one case, two jobs: job 1 has nothing to do
    assert code == 0 and out == "" and "no cases in shard 1/2 (1 case(s) in all)" in err
    assert not (tmp_path / "o").exists()
    code, _, err = run_cli("predict", CT, "-t", "spleen", "-m", coarse_model_dir, "--max-memory", "0")
    assert code == 2 and err.strip() == "Error: --max-memory must be more than nothing, got '0'"


def test_a_model_with_non_finite_weights_is_refused_at_load(run_cli, small_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-model"
    shutil.copytree(small_model_dir, broken)
    state = load_file(broken / "model.safetensors")
    state["seg_outputs.4.weight"][0] = float("nan")
    save_file(state, broken / "model.safetensors")
    code, out, err = run_cli("predict", CT, "-t", "spleen", "-m", broken, "-o", tmp_path / "s.nii.gz")
    assert code == 1 and out == "" and not (tmp_path / "s.nii.gz").exists()
    assert err.strip() == (f"Error: {broken / 'model.safetensors'}: 1 tensor(s) hold NaN or infinite values "
                           "(seg_outputs.4.weight); the weights are corrupt")


def test_a_case_whose_probabilities_fail_leaves_no_label_map_and_is_redone(run_cli, coarse_model_dir, out,
                                                                           monkeypatch):
    """A label map left beside failed probabilities made --skip-existing skip the case forever."""
    from uniseg_cli.inference import predictor

    def full_disk(path, *args, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    args = ("predict", CT, "-t", "spleen", "-m", coarse_model_dir, "-o", out, "--no-tta", "--save-probabilities",
            "npz", "--skip-existing")
    with monkeypatch.context() as patched:
        patched.setattr(predictor.np, "savez_compressed", full_disk)
        code, _, err = run_cli(*args)
    assert code == 1 and _one_error_line(err).endswith("example_ct_spleen_probabilities.npz: cannot write "
                                                       "(No space left on device)")
    assert [p.name for p in out.iterdir()] == []
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert _outputs(out) == ["example_ct_spleen.json", "example_ct_spleen.nii.gz", "example_ct_spleen_probabilities.npz"]


def test_the_next_run_removes_a_killed_runs_temporary_files(run_cli, coarse_model_dir, out):
    leftover = out / ".example_ct_spleen.nii.gz.k2j4.partial.nii.gz"
    leftover.write_bytes(b"half a label map")
    code, _, err = run_cli("predict", CT, "-t", "spleen", "-m", coarse_model_dir, "-o", out, "--no-tta")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["example_ct_spleen.json", "example_ct_spleen.nii.gz"]


def test_an_output_that_names_another_kind_of_file_is_refused(run_cli, coarse_model_dir, tmp_path):
    """`-o out.png` used to create a folder named out.png."""
    code, _, err = run_cli("predict", CT, "-t", "spleen", "-m", coarse_model_dir, "-o", tmp_path / "out.png")
    assert code == 2 and _one_error_line(err).startswith(f"Error: {tmp_path / 'out.png'}: not a label map name (end it "
                                                          "in .nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd) nor a folder")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "run.v2").mkdir()   # an existing folder with a dot in its name is a folder
    code, _, err = run_cli("predict", CT, "-t", "spleen", "-m", coarse_model_dir, "-o", tmp_path / "run.v2", "--no-tta")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "run.v2").iterdir()) == ["example_ct_spleen.json", "example_ct_spleen.nii.gz"]
