"""Raw training datasets: nnU-Net v2 and Medical Segmentation Decathlon folders, attached to tasks.

A dataset is read from its ``dataset.json``; each is attached to a task, either one the model
already knows (``kidney=./Dataset001_KiTS``: its channels, spacing and classes) or a new task made
from the dataset (its channel names, labels and median spacing). The foreground labels are taken in
the order ``dataset.json`` lists them and become the task's classes 1, 2, …; so a BraTS dataset
listing ``edema: 2, non-enhancing: 1, enhancing: 4`` maps 2→1, 1→2, 4→3 as docs/pipeline.md §2 asks.
A region dataset (nnU-Net v2: label values that are lists, plus ``regions_class_order``) becomes a
region task: its label values in increasing order are the classes, each named after the region that
writes it.

Plain data and numpy; the integrity check reads every file before any pre-processing starts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from uniseg_cli.quality.plausibility import channel_sources, check_inputs
from uniseg_cli.data.preprocessing import axial_permutation
from uniseg_cli.errors import UnisegError, UsageError
from uniseg_cli.io.images import ImageError, read_channels, read_image, strip_ending
from uniseg_cli.io.jsonfile import read_json
from uniseg_cli.tasks import CT_WINDOW, Channel, Task, resolve_task

DATASET_JSON = "dataset.json"
_KEY = re.compile(r"^[a-z][a-z0-9_]*$")


class DatasetError(UnisegError):
    """A dataset that cannot be trained on as it is (named file, one line)."""


@dataclass(frozen=True)
class TrainingCase:
    """One labelled case: its channel files in the dataset's channel order and its label map."""

    name: str
    channels: tuple[Path, ...]
    label: Path


@dataclass(frozen=True)
class Dataset:
    """A raw dataset: where it is, its channels (names from dataset.json), labels and cases.

    ``labels`` maps each foreground label name to its value in the label files, in dataset.json order.
    """

    root: Path
    format: str
    channel_names: tuple[str, ...]
    labels: tuple[tuple[str, int], ...]
    cases: tuple[TrainingCase, ...]
    regions: tuple[tuple[int, ...], ...] = ()   # a region dataset: the label values of each region
    region_order: tuple[int, ...] = ()          # nnU-Net's regions_class_order (label values)

    @property
    def label_values(self) -> tuple[int, ...]:
        return tuple(v for _, v in self.labels)


# ------------------------------------------------------------------------------------ reading
def read_dataset(root: str | Path) -> Dataset:
    """Parse ``root/dataset.json`` (nnU-Net v2 or MSD layout) and list the cases; files are not opened."""
    root = Path(root)
    meta_path = root / DATASET_JSON
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder")
    meta = read_json(meta_path, DatasetError,
                     missing="missing (a dataset folder needs nnU-Net v2's or the MSD's dataset.json)")
    if not isinstance(meta, dict):
        raise DatasetError(f"{meta_path}: expected a JSON object")
    if "training" in meta and "modality" in meta:
        dataset = _read_msd(root, meta, meta_path)
    elif "channel_names" in meta and "file_ending" in meta:
        dataset = _read_nnunet(root, meta, meta_path)
    else:
        raise DatasetError(f"{meta_path}: neither nnU-Net v2 (channel_names, labels, file_ending) "
                           "nor MSD (modality, labels, training) format")
    _check_files_listed(dataset, meta.get("numTraining"), meta_path)
    return dataset


def _check_files_listed(dataset: Dataset, declared: Any, where: Path) -> None:
    """Every file of every case exists and the case count is ``numTraining``: a dataset that lost files
    must stop here, before hours of pre-processing, not train quietly on fewer cases."""
    for case in dataset.cases:
        for path in (*case.channels, case.label):
            if not path.is_file():
                raise DatasetError(f"{path}: missing (case {case.name})")
    if declared is not None and declared != len(dataset.cases):
        raise DatasetError(f"{where}: numTraining is {declared}, but the dataset holds {len(dataset.cases)} "
                           "labelled case(s)")


def _channel_names(raw: Any, where: Path, key: str) -> tuple[str, ...]:
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{where}: {key} must be a non-empty object")
    try:
        order = sorted(raw, key=int)
    except ValueError:
        raise DatasetError(f"{where}: {key} keys must be channel numbers 0, 1, …") from None
    if [int(k) for k in order] != list(range(len(order))):
        raise DatasetError(f"{where}: {key} must number the channels 0…{len(order) - 1}")
    return tuple(str(raw[k]) for k in order)


def _label_value(name: str, value: Any, where: Path) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 255:
        raise DatasetError(f"{where}: label {name!r} must be an integer 0…255, got {value!r}")
    return value


def _regions(pairs: list[tuple[str, Any]], order: Any, where: Path) -> tuple[tuple[tuple[str, int], ...],
                                                                             tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """nnU-Net v2 regions: ``labels`` name → value or list of values, ``regions_class_order`` the value
    written for each region. Every written value must come from exactly one region, so that each class of
    the label map is named after the region that writes it."""
    regions, names = [], []
    for name, value in pairs:
        values = value if isinstance(value, list) else [value]
        values = [_label_value(name, v, where) for v in values]
        if values == [0]:
            continue
        if not values or 0 in values:
            raise DatasetError(f"{where}: region {name!r} must list foreground values, got {value!r}")
        regions.append(tuple(sorted(set(values))))
        names.append(name)
    if not isinstance(order, list) or len(order) != len(regions):
        raise DatasetError(f"{where}: regions_class_order must list one label value per region "
                           f"({len(regions)}: {', '.join(names)}), got {order!r}")
    order = [_label_value("regions_class_order", v, where) for v in order]
    union = sorted({v for r in regions for v in r})
    if sorted(order) != union:
        raise DatasetError(f"{where}: regions_class_order {order} must write each label value of the regions "
                           f"({union}) once")
    labels = tuple(sorted(((names[order.index(v)], v) for v in union), key=lambda pair: pair[1]))
    return labels, tuple(regions), tuple(order)


def _foreground(pairs: list[tuple[str, Any]], where: Path) -> tuple[tuple[str, int], ...]:
    labels = []
    for name, value in pairs:
        if isinstance(value, list):
            raise DatasetError(f"{where}: label {name!r} is a region (list of values); a region dataset needs "
                               "regions_class_order (nnU-Net v2)")
        value = _label_value(name, value, where)
        if value != 0:
            labels.append((name, value))
    values = [v for _, v in labels]
    if len(set(values)) != len(values):
        raise DatasetError(f"{where}: two labels share one value ({values})")
    if not labels:
        raise DatasetError(f"{where}: no foreground labels declared")
    return tuple(labels)


def _read_nnunet(root: Path, meta: dict[str, Any], where: Path) -> Dataset:
    channels = _channel_names(meta["channel_names"], where, "channel_names")
    raw_labels = meta.get("labels")
    if not isinstance(raw_labels, dict):
        raise DatasetError(f"{where}: labels must be an object name → value")
    regions: tuple[tuple[int, ...], ...] = ()
    order: tuple[int, ...] = ()
    if "regions_class_order" in meta:
        labels, regions, order = _regions(list(raw_labels.items()), meta["regions_class_order"], where)
    else:
        labels = _foreground(list(raw_labels.items()), where)
    ending = meta["file_ending"]
    images, label_dir = root / "imagesTr", root / "labelsTr"
    if not label_dir.is_dir():
        raise DatasetError(f"{label_dir}: missing")
    cases = []
    for label in sorted(label_dir.glob(f"*{ending}")):
        name = label.name[: -len(ending)]
        cases.append(TrainingCase(name, tuple(images / f"{name}_{c:04d}{ending}" for c in range(len(channels))),
                                  label))
    if not cases:
        raise DatasetError(f"{label_dir}: no label files ending in {ending}")
    _check_images_labelled(images, ending, {c.name for c in cases}, len(channels), label_dir)
    return Dataset(root, "nnU-Net v2", channels, labels, tuple(cases), regions, order)


def _check_images_labelled(images: Path, ending: str, labelled: set[str], channels: int, label_dir: Path) -> None:
    """Every image of ``imagesTr`` is a channel (``CASE_0000``, ``CASE_0001``, …) of a labelled case (cases
    are listed from the label files, so an image whose label file is lost would otherwise be dropped
    without a word)."""
    if not images.is_dir():
        raise DatasetError(f"{images}: missing")
    for image in sorted(images.glob(f"*{ending}")):
        if image.name.startswith("."):
            continue
        stem = image.name[: -len(ending)]
        name, _, index = stem.rpartition("_")
        if not (len(index) == 4 and index.isdigit() and name):
            raise DatasetError(f"{image}: not named like CASE_0000{ending} (nnU-Net's channel naming)")
        if int(index) >= channels:
            raise DatasetError(f"{image}: channel {index}, but {DATASET_JSON} declares {channels} channel(s)")
        if name not in labelled:
            raise DatasetError(f"{image}: no label file {label_dir / (name + ending)} (case {name})")


def _read_msd(root: Path, meta: dict[str, Any], where: Path) -> Dataset:
    channels = _channel_names(meta["modality"], where, "modality")
    raw_labels = meta.get("labels")
    if not isinstance(raw_labels, dict):
        raise DatasetError(f"{where}: labels must be an object value → name")
    try:
        pairs = [(str(name), int(value)) for value, name in raw_labels.items()]
    except ValueError:
        raise DatasetError(f"{where}: MSD label keys must be the label values") from None
    labels = _foreground(pairs, where)
    cases = []
    for entry in meta["training"]:
        if not isinstance(entry, dict) or not {"image", "label"} <= set(entry):
            raise DatasetError(f"{where}: every training entry needs image and label")
        image, label = root / entry["image"], root / entry["label"]
        cases.append(TrainingCase(strip_ending(label), (image,), label))
    if not cases:
        raise DatasetError(f"{where}: the training list is empty")
    return Dataset(root, "MSD", channels, labels, tuple(cases))


# --------------------------------------------------------------------------- tasks of datasets
def channel_for(name: str) -> Channel:
    """A task channel for a dataset channel name: CT gets the published CT window, the rest z-score."""
    upper = name.strip().upper()
    if upper == "CT":
        return Channel("CT", "CT", "ct", CT_WINDOW)
    if upper in ("PET", "SUV"):
        return Channel(name, "PET", "zscore")
    return Channel(name, "MR", "zscore")


def attach_task(spec: str, dataset: Dataset, known: Sequence[Task], spacing: tuple[float, float, float]) -> Task:
    """The task a dataset trains: a known one (checked to fit) or a new one named by ``spec``.

    ``spacing`` (the dataset's median) is the target spacing of a new task.
    """
    key = known_key(spec, known)
    classes = {value: index for index, (_, value) in enumerate(dataset.labels, start=1)}
    regions = tuple(tuple(sorted(classes[v] for v in region)) for region in dataset.regions)
    order = tuple(classes[v] for v in dataset.region_order)
    if key is not None:
        task = resolve_task(key, known)
        if (task.regions, task.region_order) != (regions, order):
            what = "regions" if dataset.regions else "plain labels"
            raise DatasetError(f"{dataset.root}: the dataset has {what}, task {task.key!r} "
                               f"{'other regions' if task.regions and dataset.regions else 'does not'}; "
                               "train it as a new task (give a new name: NAME=FOLDER)")
        if len(task.channels) != len(dataset.channel_names):
            raise DatasetError(
                f"{dataset.root}: task {task.key!r} takes {len(task.channels)} channel(s) "
                f"({', '.join(c.name for c in task.channels)}); the dataset has {len(dataset.channel_names)} "
                f"({', '.join(dataset.channel_names)})")
        if len(dataset.labels) > len(task.labels):
            raise DatasetError(
                f"{dataset.root}: task {task.key!r} has {len(task.labels)} foreground class(es) "
                f"({', '.join(task.labels)}); the dataset declares {len(dataset.labels)}")
        return task
    if not _KEY.match(spec):
        raise UsageError(f"new task name {spec!r}: use lower-case letters, digits and _ (e.g. liver_ct)")
    return Task(id=0, key=spec, name=spec.replace("_", " "), channels=tuple(channel_for(c) for c in dataset.channel_names),
                labels=tuple(name for name, _ in dataset.labels), target_spacing=spacing, regions=regions,
                region_order=order)


def known_key(spec: str, known: Sequence[Task]) -> str | None:
    """The key of the known task ``spec`` names (key, alias or id), or None for a new task."""
    try:
        return resolve_task(spec, known).key
    except UsageError:
        return None


def renumber(tasks: Sequence[Task]) -> tuple[Task, ...]:
    """Tasks with prompt ids 0…T-1 in the given order (a trained model's own numbering)."""
    return tuple(replace(t, id=i) for i, t in enumerate(tasks))


def parse_dataset_spec(spec: str) -> tuple[str | None, Path]:
    """``KEY=PATH`` or ``PATH`` (the task is then named after the folder)."""
    if "=" in spec:
        key, _, path = spec.partition("=")
        return key.strip().lower(), Path(path)
    return None, Path(spec)


def default_task_key(root: Path) -> str:
    """``Dataset001_KiTS`` → ``kits``; ``Task03_Liver`` → ``liver``."""
    name = re.sub(r"^(dataset|task)\d+_", "", root.resolve().name, flags=re.IGNORECASE).lower()
    return re.sub(r"[^a-z0-9_]+", "_", name).strip("_") or "task"


# -------------------------------------------------------------------------------- integrity
@dataclass(frozen=True)
class CaseCheck:
    """What the integrity pass learned about one case (for the fingerprint and the new-task spacing)."""

    name: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]   # axial order, as pre-processing sees it
    foreground_values: tuple[int, ...]
    accepted: tuple[str, ...] = ()        # implausible-input findings accepted with --accept-implausible


def check_case(case: TrainingCase, dataset: Dataset, accept_implausible: bool = False) -> CaseCheck:
    """Read every file of one case and refuse what training could not use, with a one-line reason
    (``read_dataset`` has checked that the files exist): also a scan that is not what its channels
    declare (``uniseg_cli.quality.plausibility``), unless ``accept_implausible``."""
    try:
        data, geometry = read_channels(case.channels, nan_to_zero=False)
        label, label_geometry = read_image(case.label, nan_to_zero=False)
    except ImageError as exc:
        raise DatasetError(str(exc)) from None
    if data.shape[0] != len(dataset.channel_names):
        raise DatasetError(f"{case.channels[0]}: {data.shape[0]} channel(s), the dataset declares "
                           f"{len(dataset.channel_names)} ({', '.join(dataset.channel_names)})")
    if not geometry.same_grid(label_geometry):
        raise DatasetError(f"{case.label}: not on its image's grid: it {label_geometry.difference(geometry, str(case.channels[0]))}")
    if np.isnan(data).any():
        raise DatasetError(f"{case.channels[0]}: contains NaN values")
    if np.isnan(label).any() or not np.array_equal(label, np.round(label)) or label.min() < 0:
        raise DatasetError(f"{case.label}: label values must be non-negative integers")
    present = tuple(int(v) for v in np.unique(label.astype(np.int64)) if v != 0)
    undeclared = sorted(set(present) - set(dataset.label_values))
    if undeclared:
        raise DatasetError(f"{case.label}: label value(s) {undeclared} are not declared in {DATASET_JSON} "
                           f"(declared: {list(dataset.label_values)})")
    findings = check_inputs(data, [channel_for(n) for n in dataset.channel_names],
                            channel_sources(case.channels, data.shape[0]),
                            geometry.modalities)
    if findings and not accept_implausible:
        raise DatasetError(f"{findings[0].line()}; --accept-implausible trains on it anyway")
    perm = axial_permutation(geometry.array_axis_world())
    return CaseCheck(case.name, tuple(data.shape[1:]), tuple(float(geometry.spacing[p]) for p in perm), present,  # type: ignore[arg-type]
                     tuple(f.line() for f in findings))


def check_labels_present(dataset: Dataset, checks: Sequence[CaseCheck]) -> list[str]:
    """Refuse a dataset whose label maps are all background (a model would learn nothing, and held-out
    Dice would read 0 with no other sign); return a warning for each declared label no case holds."""
    present = {v for c in checks for v in c.foreground_values}
    if not present:
        raise DatasetError(f"{dataset.root}: every label map of its {len(checks)} case(s) is background only: "
                           "nothing to learn (are the labels in another folder, or all 0?)")
    return [f"{dataset.root}: label {name!r} (value {value}) occurs in none of its {len(checks)} case(s); the model "
            "will never predict it" for name, value in dataset.labels if value not in present]


def label_classes(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """A label map's dataset values as the task's classes: ``values[i]`` becomes class ``i + 1``."""
    lookup = np.zeros(256, dtype=np.uint8)
    for index, value in enumerate(values):
        lookup[value] = index + 1
    return lookup[labels.astype(np.int64)]


def median_spacing(checks: Sequence[CaseCheck]) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.median(np.array([c.spacing for c in checks]), axis=0))  # type: ignore[return-value]
