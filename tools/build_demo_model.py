"""Build the bundled demo model from the real scans in ../shared/data with `uniseg preprocess` and `uniseg train`.

    python tools/build_demo_model.py WORK_FOLDER [--epochs 40] [--base-features 4] [--max-features 32]
                                                 [--no-augment] [--hold-out-dicom-ct] [--shared ../shared/data]
                                                 [--preset published] [--batch-size 2] [--patch-size Z,Y,X]

With ``--preset published`` it makes the benchmark asset of the precision-agreement benchmark instead:
the published network (patch 64×192×192, 32–320 features) trained on the same scans, so that agreement is
measured on a published-size model with trained, confident weights (docs/benchmarks.md). It is not shipped.

1. Writes nnU-Net v2 datasets into WORK_FOLDER/raw/ from the Apache-2.0 scans only:
   - CT tasks liver, kidney, spleen: TotalSegmentator's example CT and its DICOM example CT (the two
     CTs the package ships in tests/data), the latter converted to NIfTI with its label map resampled
     onto the DICOM grid (it has no kidney). Both train, so that the demo fits both shipped examples;
     --hold-out-dicom-ct holds the DICOM CT out instead. TotalSegmentator ids: spleen 1, kidneys 2+3,
     liver 5.
   - brain_tumor (T1, T1ce, T2, FLAIR): the two BrainLesion/TCGA cases with the fused BraTS-algorithm
     map; TCGA-FG-6692 (all three classes) trains, TCGA-DU-7294 is held out.
2. `uniseg preprocess` at 3 mm isotropic (so that a whole CT is a few dozen tiles of the small network).
3. `uniseg train --preset small` (or ``--preset published``) with an explicit split, on the CPU (its default precision: bf16 where
   the CPU has native bf16).
4. `uniseg predict` (default settings: TTA, step 0.5) with the final weights and `uniseg evaluate` against
   the label maps: each held-out case (WORK_FOLDER/held_out.json) and each training case, to show how well
   the model fits what it was trained on (WORK_FOLDER/training_fit.json).
The model folder is WORK_FOLDER/model; `best/` holds the best validation weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from uniseg_cli.data.datasets import label_classes

# Pancreas and vertebrae were tried (20 epochs with all five CT tasks): held-out Dice 0.00 and 0.11, and the
# three large organs did not separate by task; the demo keeps the three CT tasks it can learn in CPU minutes.
CT_TASKS = {"liver": [5], "kidney": [2, 3], "spleen": [1]}
BRAIN_LABELS = {"background": 0, "edema": 2, "non-enhancing tumour": 1, "enhancing tumour": 4}
BRAIN_TRAIN, BRAIN_VAL = "TCGA-FG-6692", "TCGA-DU-7294"


def _write(image: sitk.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def ct_cases(shared: Path) -> dict[str, tuple[sitk.Image, sitk.Image]]:
    folder = shared / "ct_abdomen_totalseg"
    ct = sitk.ReadImage(str(folder / "example_ct.nii.gz"), sitk.sitkInt16)
    seg = sitk.ReadImage(str(folder / "example_seg_fast_force_split.nii.gz"))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder / "example_ct_dicom")))
    dicom = sitk.Cast(reader.Execute(), sitk.sitkInt16)
    dicom_seg = sitk.Resample(sitk.ReadImage(str(folder / "example_seg_dicom.nii.gz")), dicom,
                              sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return {"totalseg_ct": (ct, seg), "totalseg_dicom_ct": (dicom, dicom_seg)}


def write_ct_dataset(root: Path, task: str, values: list[int], cases: dict[str, tuple[sitk.Image, sitk.Image]]) -> list[str]:
    names = []
    for name, (image, seg) in cases.items():
        array = sitk.GetArrayFromImage(seg)
        binary = np.isin(array, values).astype(np.uint8)
        if not binary.any():
            continue
        labels = sitk.GetImageFromArray(binary)
        labels.CopyInformation(image)
        _write(image, root / "imagesTr" / f"{name}_0000.nii.gz")
        _write(labels, root / "labelsTr" / f"{name}.nii.gz")
        names.append(name)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, task: 1},
        "numTraining": len(names), "file_ending": ".nii.gz"}, indent=2))
    return names


def write_brain_dataset(root: Path, shared: Path) -> list[str]:
    folders = {"TCGA-FG-6692": shared / "brain_tcga_4ch/OtherEXampleFromTCIA/OtherEXampleFromTCIA_brainles",
               "TCGA-DU-7294": shared / "brain_tcga_4ch/TCGA-DU-7294/TCGA-DU-7294_brainles"}
    for name, folder in folders.items():
        prefix = folder.name.removesuffix("_brainles")
        for channel, suffix in enumerate(("t1", "t1c", "t2", "fla")):
            _write(sitk.ReadImage(str(folder / "raw_bet" / f"{prefix}_{suffix}_bet.nii.gz")),
                   root / "imagesTr" / f"{name}_{channel:04d}.nii.gz")
        _write(sitk.ReadImage(str(folder / "fusion" / "mav.nii.gz"), sitk.sitkUInt8), root / "labelsTr" / f"{name}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}, "labels": BRAIN_LABELS,
        "numTraining": 2, "file_ending": ".nii.gz"}, indent=2))
    return list(folders)


def _score(uniseg: list[str], root: Path, task: str, case: str, prediction: Path, model: Path) -> dict:
    """``uniseg predict`` (default settings) on one case of a dataset, ``uniseg evaluate`` against its labels,
    renumbered as the task's classes (dataset.json's order: BraTS's edema 2, non-enhancing 1 and enhancing
    4 are the brain task's classes 1, 2 and 3)."""
    meta = json.loads((root / "dataset.json").read_text())
    images = ",".join(str(root / "imagesTr" / f"{case}_{c:04d}.nii.gz") for c in range(len(meta["channel_names"])))
    subprocess.run([*uniseg, "predict", images, "--task", task, "-m", str(model), "-o", str(prediction), "--device",
                    "cpu", "-q", "--no-sidecar"], check=True)
    values = [v for v in meta["labels"].values() if v != 0]
    labels = sitk.ReadImage(str(root / "labelsTr" / f"{case}.nii.gz"))
    classes = sitk.GetImageFromArray(label_classes(sitk.GetArrayFromImage(labels), values))
    classes.CopyInformation(labels)
    reference = prediction.with_name(prediction.name.replace(".nii.gz", "_reference.nii.gz"))
    sitk.WriteImage(classes, str(reference), useCompression=True)
    report = subprocess.run([*uniseg, "evaluate", str(prediction), str(reference), "--json",
                             "--labels", ",".join(str(v) for v in range(1, len(values) + 1))],
                            check=True, capture_output=True, text=True)
    return json.loads(report.stdout)["cases"][0]["labels"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batches-per-task", type=int, default=50)
    parser.add_argument("--base-features", type=int, default=4)
    parser.add_argument("--max-features", type=int, default=32)
    parser.add_argument("--hold-out-dicom-ct", action="store_true",
                        help="train the CT tasks on the example CT only and score them on the DICOM CT")
    parser.add_argument("--preset", default="small", choices=["small", "published"],
                        help="small: the bundled demo (with --base/--max-features); published: the published network")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--patch-size", help="Z,Y,X: override the preset's patch (a published network on a CPU budget)")
    parser.add_argument("--no-augment", action="store_true",
                        help="train without augmentation (and so without mirroring TTA): fits the scans fastest")
    args = parser.parse_args()
    raw = args.work / "raw"
    cases = ct_cases(args.shared)
    splits: dict[str, list[dict[str, list[str]]]] = {}
    specs = []
    for task, values in CT_TASKS.items():
        names = write_ct_dataset(raw / f"Dataset_{task}", task, values, cases)
        held_out = [n for n in names if n != "totalseg_ct"] if args.hold_out_dicom_ct else []
        splits[task] = [{"train": [n for n in names if n not in held_out], "val": held_out}]
        specs += ["-d", f"{task}={raw / f'Dataset_{task}'}"]
    write_brain_dataset(raw / "Dataset_brain_tumor", args.shared)
    splits["brain_tumor"] = [{"train": [BRAIN_TRAIN], "val": [BRAIN_VAL]}]
    specs += ["-d", f"brain_tumor={raw / 'Dataset_brain_tumor'}"]
    split_file = args.work / "splits.json"
    split_file.write_text(json.dumps(splits, indent=2))
    uniseg = [sys.executable, "-m", "uniseg_cli"]
    subprocess.run([*uniseg, "preprocess", *specs, "-o", str(args.work / "preprocessed"), "--target-spacing", "3,3,3"],
                   check=True)
    if not (args.work / "model" / "model.safetensors").exists():
        subprocess.run([*uniseg, "train", str(args.work / "preprocessed"), "-o", str(args.work / "model"),
                        "--preset", args.preset, *(["--base-features", str(args.base_features), "--max-features",
                                                    str(args.max_features)] if args.preset == "small" else []),
                        *(["--patch-size", args.patch_size] if args.patch_size else []),
                        "--batch-size", str(args.batch_size), *(["--no-augment"] if args.no_augment else []), "--epochs",
                        str(args.epochs), "--batches-per-task",
                        str(args.batches_per_task), "--val-every", "10", "--split-file", str(split_file), "--device",
                        "cpu", "--workers", "1",
                        *(["--resume"] if (args.work / "model" / "training_state.pt").exists() else [])], check=True)
    for part, name in (("val", "held_out"), ("train", "training_fit")):
        results = {}
        for task, folds in splits.items():
            for case in folds[0][part]:
                results[f"{task}/{case}"] = _score(uniseg, raw / f"Dataset_{task}", task, case,
                                                   args.work / name / task / f"{case}.nii.gz", args.work / "model")
        (args.work / f"{name}.json").write_text(json.dumps(results, indent=2))
        print(name, json.dumps({k: {label: v["dice"] for label, v in labels.items()} for k, labels in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
