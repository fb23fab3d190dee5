"""What predict writes for clinicians and researchers: DICOM SEG, RTSTRUCT, 3D Slicer segmentations,
label tables, statistics, previews; task subsets sharing the encoder; all outputs of a case or none.

One run of the bundled demo model (real, smooth organ masks) on the shipped DICOM CT series writes
every format; each test reads one back with the library its users would use.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import CT, DICOM

FORMATS = "nifti,dicom-seg,rtstruct,seg-nrrd"


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """The shipped series with the UIDs its anonymiser blanked filled in (SOP class and instance from the
    file meta, fixed study and series UIDs), as a series from PACS carries them."""
    pydicom = pytest.importorskip("pydicom", reason="the dicom extra: pip install '.[dicom]'")
    from pydicom.uid import generate_uid

    folder = tmp_path_factory.mktemp("dicom") / "abdomen"
    folder.mkdir()
    study, series_uid = generate_uid(entropy_srcs=["uniseg test study"]), generate_uid(entropy_srcs=["uniseg test series"])
    for path in sorted(DICOM.iterdir()):
        ds = pydicom.dcmread(path)
        ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        pydicom.dcmwrite(folder / path.name, ds, enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def written(series, tmp_path_factory):
    """One run: liver and spleen, every format, statistics, preview, JSON and CSV."""
    for module in ("highdicom", "rt_utils"):
        pytest.importorskip(module, reason="the dicom extra: pip install '.[dicom]'")
    from uniseg_cli.cli import main

    out = tmp_path_factory.mktemp("written")
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["-q", "predict", str(series), "-t", "liver,spleen", "-m", "uniseg-demo", "--fast", "-o", str(out),
                     "-f", FORMATS, "--statistics-csv", str(out / "stats.csv"), "--preview", "--json",
                     "--device", "cpu"])
    assert code == 0
    record = json.loads(stdout.getvalue())
    labels = sitk.GetArrayFromImage(sitk.ReadImage(record["output"]))
    return out, record, labels


def _sop_uids(files):
    import pydicom

    return [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]


def _series_files(series):
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))


def test_every_format_is_written_with_one_record(written):
    out, record, labels = written
    stem = "abdomen_liver+spleen"
    assert record["task"] == "liver+spleen" and record["output"] == str(out / f"{stem}.nii.gz")
    assert record["outputs"] == {"sidecar": str(out / f"{stem}.json"), "dicom-seg": str(out / f"{stem}.dcm"),
                                 "rtstruct": str(out / f"{stem}_rtstruct.dcm"), "seg-nrrd": str(out / f"{stem}.seg.nrrd"),
                                 "preview": str(out / f"{stem}_preview.png")}
    # the demo model's own tasks are liver, kidney, spleen, brain tumour: spleen is 5 in its merged numbering
    assert [(r["value"], r["name"]) for r in record["labels"]] == [(1, "liver"), (2, "liver tumour"), (5, "spleen")]
    assert {1, 5} <= set(np.unique(labels)) and not list(out.glob(".*"))


def test_dicom_seg_frames_equal_the_label_map_and_reference_the_series(written, series):
    import highdicom as hd
    import pydicom

    out, record, labels = written
    seg = hd.seg.segread(record["outputs"]["dicom-seg"])
    files = _series_files(series)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID and seg.Modality == "SEG"
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in sources}
    names = {d.SegmentNumber: d.SegmentLabel for d in seg.SegmentSequence}
    assert sorted(names.values()) == ["liver", "spleen"]                       # the labels present
    spleen = next(d for d in seg.SegmentSequence if d.SegmentLabel == "spleen")
    assert spleen.SegmentedPropertyTypeCodeSequence[0].CodeValue == "78961009"
    assert spleen.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    value_of = {r["name"]: r["value"] for r in record["labels"]}
    stack = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in sources], combine_segments=True,
                                              skip_overlap_checks=True)
    back = np.zeros_like(labels)
    for number, name in names.items():
        back[stack == number] = value_of[name]
    for k in range(labels.shape[0]):                                           # frame by frame, exactly
        assert np.array_equal(back[k], labels[k]), k


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="needs dciodvfy (Debian: dicom3tools; .ci/run installs it)")
@pytest.mark.parametrize("fmt", ["dicom-seg", "rtstruct"])
def test_dciodvfy_finds_no_errors(written, fmt):
    result = subprocess.run(["dciodvfy", written[1]["outputs"][fmt]], capture_output=True, text=True)
    report = result.stdout + result.stderr
    assert ("Segmentation" if fmt == "dicom-seg" else "RTStructureSet") in report
    assert [line for line in report.splitlines() if line.startswith("Error")] == [], report


def test_rtstruct_contours_rasterise_back_to_the_labels(written, series):
    from rt_utils import RTStructBuilder

    out, record, labels = written
    structure = RTStructBuilder.create_from(dicom_series_path=str(series), rt_struct_path=record["outputs"]["rtstruct"])
    assert sorted(structure.get_roi_names()) == ["liver", "spleen"]
    slot = {ds.SOPInstanceUID: i for i, ds in enumerate(structure.series_data)}
    order = [slot[uid] for uid in _sop_uids(_series_files(series))]
    for name, value in (("liver", 1), ("spleen", 5)):
        mask = structure.get_roi_mask_by_name(name)[:, :, order].transpose(2, 0, 1)
        truth = labels == value
        dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
        assert dice >= 0.95, (name, dice)


def test_seg_nrrd_reads_back_in_slicerio_with_names_colours_and_voxels(written):
    import slicerio

    from uniseg_cli.tasks import LABEL_TERMS

    out, record, labels = written
    segmentation = slicerio.read_segmentation(record["outputs"]["seg-nrrd"])
    segments = {s["name"]: s for s in segmentation["segments"]}
    assert list(segments) == ["liver", "liver tumour", "spleen"]
    for name, segment in segments.items():
        assert segment["color"] == pytest.approx([c / 255 for c in LABEL_TERMS[name].colour], abs=1e-5)
        assert segment["terminology"]["type"][1] == LABEL_TERMS[name].type.value
    voxels = segmentation["voxels"].transpose(2, 1, 0)                          # slicerio's (i, j, k) → (z, y, x)
    assert np.array_equal(voxels, labels)
    image = sitk.ReadImage(record["output"])
    matrix = segmentation["ijkToLPS"]
    assert np.allclose(matrix[:3, 3], image.GetOrigin(), atol=1e-4)
    assert np.allclose(matrix[:3, :3], np.asarray(image.GetDirection()).reshape(3, 3) * image.GetSpacing(), atol=1e-5)


def test_statistics_equal_numpys_on_the_input(written, series):
    from uniseg_cli.io.images import read_image

    out, record, labels = written
    intensity = read_image(series)[0][0]
    for entry in record["labels"]:
        inside = intensity[labels == entry["value"]].astype(np.float64)
        if not inside.size:
            assert entry["statistics"] is None
            continue
        expected = {"mean": inside.mean(), "std": inside.std(), "median": np.median(inside), "min": inside.min(),
                    "max": inside.max(), "p5": np.percentile(inside, 5), "p95": np.percentile(inside, 95)}
        for key, value in expected.items():
            assert entry["statistics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
        z, y, x = np.nonzero(labels == entry["value"])
        image = sitk.ReadImage(record["output"])
        corners = [image.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
                   for i in (x.min(), x.max()) for j in (y.min(), y.max()) for k in (z.min(), z.max())]
        assert entry["statistics"]["bbox_mm"]["min"] == pytest.approx(np.min(corners, axis=0), abs=1e-3)
        assert entry["statistics"]["bbox_mm"]["max"] == pytest.approx(np.max(corners, axis=0), abs=1e-3)
    rows = (out / "stats.csv").read_text().splitlines()
    assert rows[0].startswith("case,task,value,name,voxels,volume_ml,mean,std,median,min,max,p5,p95,bbox_min_x")
    assert [r.split(",")[:4] for r in rows[1:]] == [["abdomen", "liver", "1", "liver"],
                                                    ["abdomen", "liver", "2", "liver tumour"],
                                                    ["abdomen", "spleen", "5", "spleen"]]


def test_the_preview_shows_each_label_in_its_colour_in_all_three_panels(tmp_path):
    """Each panel's centre pixel is the label's colour blended over a gray: (2·pixel − colour) is gray."""
    from matplotlib.image import imread

    from uniseg_cli.inference.predictor import Label
    from uniseg_cli.io.images import read_image
    from uniseg_cli.outputs.preview import OPACITY, write_preview

    data, geometry = read_image(CT)
    seg = np.asarray(nib.load(CT.parent / "example_seg_fast_force_split.nii.gz").dataobj).transpose(2, 1, 0)
    labels = np.where(seg == 1, 6, 0).astype(np.uint8)                          # TotalSegmentator's spleen
    legend = [Label(6, "spleen", "spleen")]
    path = tmp_path / "p.png"
    layout = write_preview(path, data[0], labels, legend, geometry, title="spleen", is_ct=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)[..., :3]
    assert pixels.shape[:2] == layout.size
    colour = np.array(legend[0].terms.colour) / 255
    for panel, (row, col) in layout.centre.items():
        gray = (pixels[row, col] - OPACITY * colour) / (1 - OPACITY)
        assert np.ptp(gray) < 0.03, (panel, pixels[row, col])                  # a gray under the spleen colour
        assert np.ptp(pixels[row, col]) > 0.05, panel                           # and visibly coloured


def test_a_task_subset_equals_all_restricted_and_runs_the_encoder_once_per_tile(coarse_model_dir, ct_volume):
    from uniseg_cli.inference.predictor import Segmenter
    from uniseg_cli.inference.sliding_window import WindowOptions, tile_starts

    segmenter = Segmenter(coarse_model_dir, device="cpu", window=WindowOptions(mirror=False))
    calls = []
    encode = segmenter.model.encode
    segmenter.model.encode = lambda x: calls.append(x.shape[0]) or encode(x)
    subset_inputs = segmenter.prepare_array(ct_volume, (3.0, 3.0, 3.0), "liver,spleen")
    subset = segmenter.run(subset_inputs, split=True)
    (group, x, _), = subset_inputs.groups                                        # one spacing: one group, one pass
    assert [t.key for t in group] == ["liver", "spleen"]
    starts = tile_starts(x.shape[1:], segmenter.model.config.patch_size, 0.5)
    assert sum(calls) == np.prod([len(axis) for axis in starts]) == 8          # tiles, not tiles × tasks
    everything = segmenter.run(segmenter.prepare_array(ct_volume, (3.0, 3.0, 3.0), "all"), split=True)
    for key in ("liver", "spleen"):
        assert np.array_equal(subset.tasks[key], everything.tasks[key]), key
    merged = np.where(subset.tasks["liver"] > 0, subset.tasks["liver"], 0)         # the rule of `all`:
    merged = np.where(subset.tasks["spleen"] > 0, subset.tasks["spleen"] + 10, merged)   # the later task wins
    assert np.array_equal(subset.labels, merged.astype(np.uint8))
    assert [(l.value, l.name) for l in subset.legend] == [(1, "liver"), (2, "liver tumour"), (11, "spleen")]


def test_split_writes_one_map_per_task_in_its_own_numbering(run_cli, coarse_model_dir, tmp_path):
    code, stdout, err = run_cli("predict", CT, "-t", "liver,spleen", "-m", coarse_model_dir, "-o", tmp_path,
                                "--split", "--no-tta", "--json")
    assert code == 0, err
    record = json.loads(stdout)
    assert record["output"] == str(tmp_path / "example_ct_liver.nii.gz")
    assert record["outputs"]["spleen:nifti"] == str(tmp_path / "example_ct_spleen.nii.gz")
    assert record["outputs"]["liver:nifti"] == str(tmp_path / "example_ct_liver.nii.gz")    # every map, the first too
    assert record["outputs"]["liver:sidecar"] == str(tmp_path / "example_ct_liver.json")    # the case record
    assert sorted(p.name for p in tmp_path.iterdir()) == ["example_ct_liver.json", "example_ct_liver.nii.gz",
                                                          "example_ct_spleen.json", "example_ct_spleen.nii.gz"]
    spleen = np.asarray(nib.load(tmp_path / "example_ct_spleen.nii.gz").dataobj)
    assert set(np.unique(spleen)) <= {0, 1}
    assert [(r["value"], r["task"], r["output"].rsplit("/", 1)[1]) for r in record["labels"]] == [
        (1, "liver", "example_ct_liver.nii.gz"), (2, "liver", "example_ct_liver.nii.gz"),
        (1, "spleen", "example_ct_spleen.nii.gz")]
    code, stdout, _ = run_cli("predict", CT, "-t", "liver,spleen", "-m", coarse_model_dir, "-o", tmp_path, "--split",
                              "--skip-existing", "--json")
    assert code == 0 and json.loads(stdout)["skipped"] is True                # done: every task's map is there
    code, _, err = run_cli("predict", CT, "-t", "liver,spleen", "-m", coarse_model_dir, "-o", tmp_path / "x.nii.gz",
                           "--split")
    assert code == 2 and "--split writes one file per task; give a folder" in err


def test_dicom_formats_need_a_dicom_input_and_a_failing_format_leaves_nothing(run_cli, coarse_model_dir, series,
                                                                              tmp_path, monkeypatch):
    code, _, err = run_cli("predict", CT, "-t", "liver", "-m", coarse_model_dir, "-o", tmp_path, "-f", "dicom-seg")
    assert code == 2 and "--output-format dicom-seg references the source DICOM series" in err
    assert list(tmp_path.iterdir()) == []
    code, _, err = run_cli("predict", CT, "-t", "liver", "-m", coarse_model_dir, "-o", tmp_path, "-f", "nifti,png")
    assert code == 2 and "use one or more of nifti, dicom-seg, rtstruct, seg-nrrd" in err

    from uniseg_cli.outputs import slicer

    def broken(path, *args, **kwargs):
        path.write_bytes(b"half a file")
        raise RuntimeError("slicerio failed")

    monkeypatch.setattr(slicer, "write_seg_nrrd", broken)
    code, stdout, err = run_cli("predict", series, "-t", "liver", "-m", coarse_model_dir, "-o", tmp_path, "--no-tta",
                                "-f", "dicom-seg,seg-nrrd,nifti", "--preview", "--json")
    assert code == 1 and "slicerio failed" in err and json.loads(stdout)["error"]
    assert list(tmp_path.iterdir()) == []                                      # not the SEG written before it


def test_an_anonymised_series_without_uids_is_refused_for_dicom_outputs(run_cli, coarse_model_dir, tmp_path):
    """The shipped files' anonymiser blanked their UIDs: a SEG would reference nothing."""
    code, _, err = run_cli("predict", DICOM, "-t", "liver", "-m", coarse_model_dir, "-o", tmp_path, "--no-tta",
                           "-f", "dicom-seg")
    assert code == 1 and "has no SOPClassUID, SOPInstanceUID, StudyInstanceUID, SeriesInstanceUID" in err
    assert list(tmp_path.iterdir()) == []


def test_without_the_dicom_extra_the_error_says_what_to_install(run_cli, coarse_model_dir, series, tmp_path,
                                                                monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "highdicom", None)                        # import highdicom fails
    code, _, err = run_cli("predict", series, "-t", "liver", "-m", coarse_model_dir, "-o", tmp_path, "--no-tta",
                           "-f", "dicom-seg")
    assert code == 2 and err.strip().endswith("--output-format dicom-seg needs the highdicom package: "
                                              "pip install 'uniseg-cli[dicom]'")
    assert list(tmp_path.iterdir()) == []


def test_outputs_into_the_input_series_folder_are_refused(run_cli, coarse_model_dir, series):
    before = sorted(p.name for p in series.iterdir())
    code, _, err = run_cli("predict", series, "-t", "liver", "-m", coarse_model_dir, "-o", series, "-f", "dicom-seg")
    assert code == 2 and f"would be written into the input series folder {series}" in err
    assert sorted(p.name for p in series.iterdir()) == before


def test_one_preview_file_for_several_cases_is_a_usage_error(run_cli, coarse_model_dir, tmp_path):
    code, _, err = run_cli("predict", CT, DICOM, "-t", "liver", "-m", coarse_model_dir, "-o", tmp_path,
                           "--preview-file", tmp_path / "p.png")
    assert code == 2 and "names one file, but there are several cases; use --preview" in err
    code, _, err = run_cli("predict", CT, "-t", "liver", "-m", coarse_model_dir, "--preview-file", tmp_path / "p.jpg")
    assert code == 2 and "--preview-file" in err and "must end in .png" in err
    assert list(tmp_path.iterdir()) == []


def test_a_region_tasks_formats_carry_its_regions_with_their_voxels(series, tmp_path):
    """A region task (body ⊃ bone, nested, from the real CT's own HU) written as DICOM SEG, seg.nrrd and
    RTSTRUCT: each holds the regions (body = both classes), overlapping, named as the regions; read back
    with highdicom, slicerio and rt-utils they hold the regions' voxels. The NIfTI map keeps the classes."""
    for module in ("highdicom", "rt_utils"):
        pytest.importorskip(module, reason="the dicom extra: pip install '.[dicom]'")
    import highdicom as hd
    import pydicom
    import slicerio
    from rt_utils import RTStructBuilder

    from uniseg_cli.inference.phases import Label
    from uniseg_cli.io.images import read_channels
    from uniseg_cli.outputs.formats import FORMATS, MapToWrite
    from uniseg_cli.tasks import CT_WINDOW, Channel, Task

    data, geometry = read_channels([series])
    hu = data[0]
    labels = np.where(hu > 300, 2, np.where(hu > -300, 1, 0)).astype(np.uint8)     # 1 soft tissue, 2 bone
    task = Task(0, "body_regions", "body", (Channel("CT", "CT", "ct", CT_WINDOW),), ("body", "bone"),
                (3.0, 1.5, 1.5), regions=((1, 2), (2,)), region_order=(1, 2))
    manager = task.label_manager
    assert [c.name for c in manager.classes] == ["body without bone", "bone"]
    legend = [Label(c.values[0], c.name, task.key) for c in manager.classes]
    item = MapToWrite(labels, legend, geometry, "test", task.key, manager.regions)
    assert [(s.name, s.values) for s in item.segments] == [("body", (1, 2)), ("bone", (2,))]
    paths = {"dicom-seg": tmp_path / "r.dcm", "seg-nrrd": tmp_path / "r.seg.nrrd", "rtstruct": tmp_path / "r_rt.dcm"}
    for fmt, path in paths.items():
        FORMATS[fmt].write(path, item)
    truth = {"body": labels > 0, "bone": labels == 2}

    seg = hd.seg.segread(paths["dicom-seg"])
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in _series_files(series)]
    uids = [ds.SOPInstanceUID for ds in sources]
    numbers = {d.SegmentLabel: d.SegmentNumber for d in seg.SegmentSequence}
    assert list(numbers) == ["body", "bone"]
    for name, mask in truth.items():
        stack = seg.get_pixels_by_source_instance(uids, segment_numbers=[numbers[name]])[..., 0].astype(bool)
        assert np.array_equal(stack, mask), name                                 # exactly, overlap included

    segmentation = slicerio.read_segmentation(str(paths["seg-nrrd"]))
    assert [s["name"] for s in segmentation["segments"]] == ["body", "bone"]
    for name, mask in truth.items():
        assert np.array_equal(slicerio.segment_mask(segmentation, name).transpose(2, 1, 0), mask), name

    structure = RTStructBuilder.create_from(dicom_series_path=str(series), rt_struct_path=str(paths["rtstruct"]))
    assert sorted(structure.get_roi_names()) == ["body", "bone"]
    slot = {ds.SOPInstanceUID: i for i, ds in enumerate(structure.series_data)}
    order = [slot[uid] for uid in uids]
    for name, mask in truth.items():
        back = structure.get_roi_mask_by_name(name)[:, :, order].transpose(2, 0, 1)
        assert 2 * (back & mask).sum() / (back.sum() + mask.sum()) >= 0.9, name   # polygons of a noisy mask


def test_a_structure_has_one_colour_in_merged_and_split_maps():
    """Colours of labels the terminology table does not know were picked by their value in one map."""
    from uniseg_cli.inference.phases import Label

    merged, split = Label(7, "my organ", "my_task"), Label(1, "my organ", "my_task")
    assert merged.terms == split.terms
