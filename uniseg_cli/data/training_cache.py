"""``uniseg preprocess``: raw datasets to memory-mappable training arrays, and reading them back.

The folder it writes::

    plan.json                  the tasks (in prompt order), their datasets and label values
    <task>/fingerprint.json    spacings, shapes, intensity statistics, class voxel counts
    <task>/<case>.npy          float32 (channels, z, y, x): the network input, as ``predict`` makes it
    <task>/<case>_seg.npy      uint8 (z, y, x): class indices of the task
    <task>/<case>.json         original geometry, permutation, crop box, spacings, class voxel locations

Images go through ``preprocessing.preprocess``, the function ``predict`` uses; labels through the
same crop and resampling. A case counts as done when its ``.json`` exists (written last, atomically),
so an interrupted run resumes where it stopped. No pickle anywhere.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from uniseg_cli.data.datasets import (
    CaseCheck,
    Dataset,
    DatasetError,
    TrainingCase,
    attach_task,
    check_case,
    check_labels_present,
    default_task_key,
    known_key,
    label_classes,
    median_spacing,
    parse_dataset_spec,
    read_dataset,
    renumber,
)
from uniseg_cli.data.preprocessing import preprocess, preprocess_labels
from uniseg_cli.errors import UnisegError, UsageError, first_line
from uniseg_cli.io.atomic import atomic_file, make_folder, write_text
from uniseg_cli.io.images import read_channels, read_image
from uniseg_cli.io.jsonfile import read_json
from uniseg_cli.progress import counting_bar
from uniseg_cli.tasks import UPSTREAM_TASKS, Task

log = logging.getLogger(__name__)

PLAN_NAME = "plan.json"
PLAN_FORMAT = "uniseg-preprocessed"
PLAN_VERSION = 1
#: nnU-Net's foreground sampling keeps this many voxel positions per class (at least 1% of them).
LOCATIONS_PER_CLASS = 10_000
INTENSITY_SAMPLES = 10_000


@dataclass(frozen=True)
class TaskData:
    """One task of a pre-processed folder: the task (model numbering), its dataset and cases."""

    task: Task
    dataset: str
    label_values: tuple[int, ...]
    cases: tuple[str, ...]
    folder: Path

    def image(self, case: str) -> np.ndarray:
        return np.load(self.folder / f"{case}.npy", mmap_mode="r")

    def labels(self, case: str) -> np.ndarray:
        return np.load(self.folder / f"{case}_seg.npy", mmap_mode="r")

    def properties(self, case: str) -> dict[str, Any]:
        return json.loads((self.folder / f"{case}.json").read_text(encoding="utf-8"))

    def locations(self, case: str) -> dict[int, np.ndarray]:
        """Sampled voxel positions (n, 3) of each class present in the case."""
        raw = self.properties(case)["class_locations"]
        return {int(c): np.asarray(v, dtype=np.int64).reshape(-1, 3) for c, v in raw.items()}


def read_plan(folder: str | Path) -> list[TaskData]:
    """The tasks of a pre-processed folder, checked to be complete."""
    folder = Path(folder)
    path = folder / PLAN_NAME
    plan = read_json(path, UnisegError, missing="missing: not a pre-processed folder (run `uniseg preprocess`)")
    if plan.get("format") != PLAN_FORMAT or plan.get("format_version") != PLAN_VERSION:
        raise UnisegError(f"{path}: not a uniseg pre-processing plan of version {PLAN_VERSION}")
    tasks = []
    for entry in plan["tasks"]:
        task = Task.from_dict(entry["task"])
        data = TaskData(task, entry["dataset"], tuple(entry["label_values"]), tuple(entry["cases"]),
                        folder / task.key)
        missing = [c for c in data.cases if not (data.folder / f"{c}.json").exists()]
        if missing:
            raise UnisegError(f"{data.folder}: {len(missing)} case(s) not pre-processed yet ({missing[0]}, …); "
                              "rerun `uniseg preprocess` to finish")
        for case in data.cases:  # before training starts, not when the sampler first reaches the case
            problem = case_incomplete(data.folder, case)
            if problem is not None:
                raise UnisegError(f"{problem}; rerun `uniseg preprocess` with the same datasets: it redoes the case")
        tasks.append(data)
    return tasks


def case_incomplete(folder: Path, case: str) -> str | None:
    """Why a pre-processed case is not complete (None: it is): its ``.json`` (written last) is missing, or
    an array file is missing, truncated or not an array (a disk that filled up, a copy cut short)."""
    if not (folder / f"{case}.json").exists():
        return f"{folder / case}.json: missing"
    for path in (folder / f"{case}.npy", folder / f"{case}_seg.npy"):
        try:
            with open(path, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(handle)
                expected = handle.tell() + int(np.prod(shape)) * dtype.itemsize
        except FileNotFoundError:
            return f"{path}: missing"
        except (OSError, ValueError) as exc:
            return f"{path}: not a readable array ({first_line(exc)})"
        size = path.stat().st_size
        if size < expected:
            return f"{path}: ends after {size} of {expected} bytes (truncated)"
    return None


# ---------------------------------------------------------------------------------- preprocess
def preprocess_datasets(specs: Sequence[str], output: str | Path, *, known: Sequence[Task] = UPSTREAM_TASKS,
                        workers: int | None = None, progress: bool = True,
                        target_spacing: tuple[float, float, float] | None = None,
                        accept_implausible: bool = False) -> list[TaskData]:
    """Check every dataset, then pre-process every case not done yet; returns the tasks written.

    ``target_spacing`` (z, y, x mm) replaces every task's spacing, e.g. to train a coarse, fast model.
    ``accept_implausible`` trains on scans that fail the input checks (each logged as a warning).
    """
    output = Path(output)
    if not specs:
        raise UsageError("give at least one --dataset [TASK=]FOLDER")
    workers = workers or os.cpu_count() or 1
    datasets: list[tuple[str, Dataset]] = []
    for spec in specs:
        key, root = parse_dataset_spec(spec)
        dataset = read_dataset(root)
        key = key or default_task_key(root)
        datasets.append((known_key(key, known) or key, dataset))
    keys = [k for k, _ in datasets]
    if len(set(keys)) != len(keys):
        raise UsageError(f"two datasets for one task ({', '.join(keys)}); give each its own TASK=")

    # 1. integrity: every file of every case not done yet, before any work
    checks: list[list[CaseCheck]] = []
    todo = [(key, d, case) for key, d in datasets for case in d.cases
            if case_incomplete(output / key, case.name) is not None]
    fresh = _map(check_case, [(case, d, accept_implausible) for _, d, case in todo], workers, "checking", progress)
    for check in fresh:
        for line in check.accepted:
            log.warning("%s (accepted: --accept-implausible)", line)
    fresh_by_case = {(key, c.name): r for (key, _, c), r in zip(todo, fresh)}
    for key, dataset in datasets:
        checks.append([fresh_by_case.get((key, case.name)) or _stored_check(output / key, case.name)
                       for case in dataset.cases])

    for (_, dataset), task_checks in zip(datasets, checks):
        for warning in check_labels_present(dataset, task_checks):
            log.warning("%s", warning)
    tasks = renumber([attach_task(key, dataset, known, median_spacing(c))
                      for (key, dataset), c in zip(datasets, checks)])
    if target_spacing is not None:
        if len(target_spacing) != 3 or min(target_spacing) <= 0:
            raise UsageError(f"target spacing must be three positive numbers (z, y, x mm), got {target_spacing}")
        tasks = tuple(replace(t, target_spacing=tuple(float(s) for s in target_spacing)) for t in tasks)
    for task, (_, dataset) in zip(tasks, datasets):
        log.info("task %s: %d case(s) from %s (%s), %d channel(s), labels %s, target spacing %s mm", task.key,
                 len(dataset.cases), dataset.root, dataset.format, len(task.channels),
                 ", ".join(f"{v}→{i + 1} {n}" for i, (n, v) in enumerate(dataset.labels))
                 + ("; regions " + ", ".join(f"{s.name} {list(s.values)}" for s in task.label_manager.regions)
                    if task.label_manager.has_regions else ""),
                 "×".join(f"{s:g}" for s in task.target_spacing))
    plan = {
        "format": PLAN_FORMAT, "format_version": PLAN_VERSION,
        "tasks": [{"task": task.to_dict(), "dataset": str(dataset.root.resolve()), "dataset_format": dataset.format,
                   "label_values": list(dataset.label_values), "cases": [c.name for c in dataset.cases]}
                  for task, (_, dataset) in zip(tasks, datasets)],
    }
    _write_plan(output, plan)

    # 2. pre-process what is not done yet, in parallel, each case written atomically
    jobs = [(case, dataset, task, output / task.key) for task, (_, dataset) in zip(tasks, datasets)
            for case in dataset.cases if case_incomplete(output / task.key, case.name) is not None]
    for task in tasks:
        (output / task.key).mkdir(parents=True, exist_ok=True)
    log.info("pre-processing %d case(s) with %d worker(s) into %s", len(jobs), min(workers, max(len(jobs), 1)), output)
    _map(_preprocess_case, jobs, workers, "pre-processing", progress)
    for task, (_, dataset), task_checks in zip(tasks, datasets, checks):
        _write_fingerprint(output / task.key, task, dataset, task_checks)
    return read_plan(output)


def _stored_check(folder: Path, name: str) -> CaseCheck:
    props = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    return CaseCheck(name, tuple(props["shape"]), tuple(props["axial_spacing"]), tuple(props["foreground_values"]))  # type: ignore[arg-type]


def _one_thread() -> None:
    """Worker processes share the cores: one torch thread each (resampling runs in torch)."""
    import torch

    torch.set_num_threads(1)


def _write_plan(output: Path, plan: dict[str, Any]) -> None:
    path = output / PLAN_NAME
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UnisegError(f"{path}: unreadable ({first_line(exc)}); remove {output} to pre-process again") from None
        if old != plan:
            raise UsageError(f"{output}: holds a pre-processing of other datasets or tasks; use another output folder")
        return
    make_folder(output)
    write_text(path, json.dumps(plan, indent=2) + "\n")


def _map(function: Any, jobs: list[tuple[Any, ...]], workers: int, what: str, progress: bool) -> list[Any]:
    """Run ``function(*job)`` for every job, in worker processes when there are several; in order."""
    if not jobs:
        return []
    with counting_bar(what, len(jobs), enabled=progress) as advance:
        if workers <= 1 or len(jobs) == 1:
            results = []
            for job in jobs:
                results.append(function(*job))
                advance(1)
            return results
        # spawn: workers start clean instead of inheriting a forked copy of a threaded parent (torch, OpenMP)
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_one_thread) as pool:
            futures = [pool.submit(function, *job) for job in jobs]
            results = []
            for future in futures:
                results.append(future.result())
                advance(1)
            return results


def _preprocess_case(case: TrainingCase, dataset: Dataset, task: Task, folder: Path) -> None:
    """Pre-process one case exactly as ``predict`` would, plus its labels; the ``.json`` is written last."""
    data, geometry = read_channels(case.channels)
    raw_labels, _ = read_image(case.label)
    classes = label_classes(raw_labels[0], dataset.label_values)
    samples = _intensity_samples(data, classes)
    image, info = preprocess(data, geometry.spacing, geometry.array_axis_world(), task.channels, task.target_spacing)
    image = image.numpy()
    del data
    labels = preprocess_labels(classes, info)
    properties = {
        "case": case.name,
        "channels": [str(p) for p in case.channels],
        "label": str(case.label),
        "shape": list(geometry.shape),
        "spacing": list(geometry.spacing),
        "origin": list(geometry.origin),
        "direction": list(geometry.direction),
        "permutation": list(info.permutation),
        "axial_spacing": list(info.spacing),
        "bbox": [[s.start, s.stop] for s in info.bbox],
        "target_spacing": list(info.target_spacing),
        "preprocessed_shape": list(labels.shape),
        "foreground_values": sorted(int(v) for v in np.unique(raw_labels) if v != 0),
        "intensity_samples": samples,
        "class_locations": {str(c): locs.tolist() for c, locs in class_locations(labels).items()},
    }
    for suffix, array in (("", image), ("_seg", labels)):
        with atomic_file(folder / f"{case.name}{suffix}.npy", suffix=".npy") as tmp:
            np.save(tmp, np.ascontiguousarray(array))
    write_text(folder / f"{case.name}.json", json.dumps(properties) + "\n")


def class_locations(labels: np.ndarray, *, seed: int = 1234) -> dict[int, np.ndarray]:
    """Up to ``LOCATIONS_PER_CLASS`` voxel positions per class (at least 1% of its voxels), seeded."""
    rng = np.random.default_rng(seed)
    found = {}
    for value in np.unique(labels):
        if value == 0:
            continue
        positions = np.argwhere(labels == value)
        count = max(min(LOCATIONS_PER_CLASS, len(positions)), int(np.ceil(len(positions) * 0.01)))
        found[int(value)] = positions[np.sort(rng.choice(len(positions), count, replace=False))]
    return found


def _intensity_samples(data: np.ndarray, classes: np.ndarray) -> list[list[float]]:
    """Raw intensities of up to ``INTENSITY_SAMPLES`` foreground voxels per channel (nnU-Net's fingerprint)."""
    mask = classes > 0
    rng = np.random.default_rng(0)
    out = []
    for channel in data:
        values = channel[mask]
        if values.size > INTENSITY_SAMPLES:
            values = values[rng.choice(values.size, INTENSITY_SAMPLES, replace=False)]
        out.append([float(v) for v in values])
    return out


def _write_fingerprint(folder: Path, task: Task, dataset: Dataset, checks: Sequence[CaseCheck]) -> None:
    properties = [json.loads((folder / f"{c.name}.json").read_text(encoding="utf-8")) for c in checks]
    intensity = []
    for channel, name in enumerate(dataset.channel_names):
        values = np.concatenate([np.asarray(p["intensity_samples"][channel], dtype=np.float64) for p in properties])
        stats: dict[str, Any] = {"channel": name, "samples": int(values.size)}
        if values.size:
            stats.update(mean=float(values.mean()), std=float(values.std()), min=float(values.min()),
                         max=float(values.max()), percentile_00_5=float(np.percentile(values, 0.5)),
                         percentile_99_5=float(np.percentile(values, 99.5)))
        intensity.append(stats)
    voxels: dict[str, int] = {}
    for case in checks:
        labels = np.load(folder / f"{case.name}_seg.npy", mmap_mode="r")
        counts = np.bincount(np.asarray(labels).ravel(), minlength=task.num_classes)
        for c in range(1, task.num_classes):
            voxels[task.labels[c - 1]] = voxels.get(task.labels[c - 1], 0) + int(counts[c])
    fingerprint = {
        "task": task.key,
        "dataset": str(dataset.root.resolve()),
        "cases": len(checks),
        "spacings": [list(c.spacing) for c in checks],
        "shapes": [list(c.shape) for c in checks],
        "median_spacing": list(median_spacing(checks)),
        "target_spacing": list(task.target_spacing),
        "preprocessed_shapes": [p["preprocessed_shape"] for p in properties],
        "intensity": intensity,
        "class_voxels": voxels,
        "class_locations": "per case, in <case>.json",
    }
    write_text(folder / "fingerprint.json", json.dumps(fingerprint, indent=2) + "\n")


__all__ = ["TaskData", "read_plan", "preprocess_datasets", "class_locations", "DatasetError"]
