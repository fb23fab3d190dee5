"""Shared fixtures: the CLI run in-process, tiny models, and a real CT patch."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
CT = DATA / "example_ct.nii.gz"
DICOM = DATA / "example_ct_dicom"  # a different CT (20 axial slices, 2 mm apart) as a DICOM series


def write_pet_like(path: Path) -> Path:
    """A PET-like second channel on the CT's grid (non-negative, uptake in soft tissue): what a CT+PET
    case's PET file holds as far as the input checks can tell, made from the real CT."""
    import nibabel as nib
    import numpy as np

    ct = nib.load(CT)
    values = np.asarray(ct.dataobj, dtype=np.float32)
    nib.Nifti1Image(np.clip(values + 100, 0, 400) / 80, ct.affine).to_filename(path)
    return path


@pytest.fixture(autouse=True)
def user_home(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own empty model store and settings, never the developer's own."""
    home = tmp_path_factory.mktemp("uniseg-home")
    monkeypatch.setenv("UNISEG_HOME", str(home))
    for name in ("UNISEG_MODEL", "UNISEG_WEIGHTS_MIRROR"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def run_cli(capsys):
    """Run ``uniseg ARGS…`` through the real entry point; returns (exit code, stdout, stderr)."""
    from uniseg_cli.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def ct_volume():
    """The real abdominal CT as a float32 (z, y, x) array in HU (SimpleITK's axis order)."""
    import nibabel as nib
    import numpy as np

    return np.ascontiguousarray(np.asarray(nib.load(CT).dataobj, dtype=np.float32).transpose(2, 1, 0))


@pytest.fixture(scope="session")
def ct_patch(ct_volume):
    """A 32×64×64 patch through the kidneys of the real CT, CT-normalised, shape (1, 1, z, y, x)."""
    import numpy as np
    import torch

    z, y, x = (s // 2 for s in ct_volume.shape)
    patch = ct_volume[z - 16:z + 16, y - 32:y + 32, x - 32:x + 32]
    patch = (np.clip(patch, -325, 325) + 325) / 650
    return torch.from_numpy(np.ascontiguousarray(patch))[None, None]


@pytest.fixture
def small_model():
    """A freshly initialised tiny model (patch 32×64×64, 4 base features), seeded."""
    import torch

    from uniseg_cli.config import small_config
    from uniseg_cli.model.network import UniSeg

    torch.manual_seed(0)
    return UniSeg(small_config()).eval()


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def coarse_model_dir(tmp_path_factory) -> Path:
    """A tiny model folder whose tasks use 8×4×4 mm spacing, so a whole CT is a handful of tiles.

    Same tasks, channels and labels as the published model; only the spacing (and the network
    size) differ, which keeps CLI tests on real scans at about a second per case.
    """
    import dataclasses

    import torch

    from uniseg_cli import save_model
    from uniseg_cli.config import small_config
    from uniseg_cli.model.network import UniSeg
    from uniseg_cli.tasks import UPSTREAM_TASKS

    tasks = tuple(dataclasses.replace(t, target_spacing=(8.0, 4.0, 4.0)) for t in UPSTREAM_TASKS)
    torch.manual_seed(0)
    model = UniSeg(small_config(tasks=tasks))
    return save_model(model, tmp_path_factory.mktemp("models") / "coarse")


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory) -> Path:
    """A tiny model folder with the published tasks and spacings."""
    import torch

    from uniseg_cli import save_model
    from uniseg_cli.config import small_config
    from uniseg_cli.model.network import UniSeg

    torch.manual_seed(0)
    return save_model(UniSeg(small_config()), tmp_path_factory.mktemp("models") / "small")


def write_kidney_dataset(root: Path, *, slabs=((0, 60), (26, 86), (52, 112)), classes=None, meta=None) -> Path:
    """An nnU-Net v2 dataset made from the real CT: axial slabs of it as cases, both kidneys as label 1.

    ``classes(seg)`` maps TotalSegmentator's map to other label values, with ``meta`` the dataset.json
    fields that describe them (``labels``, ``regions_class_order``)."""
    import json

    import nibabel as nib
    import numpy as np

    ct = nib.load(CT)
    seg = np.asarray(nib.load(DATA / "example_seg_fast_force_split.nii.gz").dataobj)
    image = np.asarray(ct.dataobj)
    labels = (classes(seg) if classes is not None else np.isin(seg, (2, 3))).astype(np.uint8)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i, (low, high) in enumerate(slabs):
        affine = ct.affine.copy()
        affine[:3, 3] = ct.affine[:3, :3] @ [0, 0, low] + ct.affine[:3, 3]
        nib.save(nib.Nifti1Image(image[:, :, low:high].astype(np.int16), affine), root / f"imagesTr/ct{i}_0000.nii.gz")
        nib.save(nib.Nifti1Image(labels[:, :, low:high], affine), root / f"labelsTr/ct{i}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "kidney": 1},
        "numTraining": len(slabs), "file_ending": ".nii.gz", **(meta or {})}))
    return root


@pytest.fixture(scope="session")
def kidney_dataset(tmp_path_factory) -> Path:
    return write_kidney_dataset(tmp_path_factory.mktemp("raw") / "Dataset001_KidneySlabs")


@pytest.fixture(scope="session")
def kidney_prep(kidney_dataset, tmp_path_factory) -> Path:
    """The kidney dataset pre-processed as a new task ``kidney_slabs`` at its own 3 mm spacing."""
    from uniseg_cli.data.training_cache import preprocess_datasets

    out = tmp_path_factory.mktemp("prep") / "prep"
    preprocess_datasets([f"kidney_slabs={kidney_dataset}"], out, workers=1, progress=False)
    return out
