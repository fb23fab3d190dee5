"""nnU-Net's connected-component post-processing, opt-in and recorded in the case record.

``--keep-largest NAMES|all``: each named label keeps its largest connected component (26-connected),
or as many as the structure has (both kidneys: ``uniseg_cli.quality.anatomy``); ``--min-component-ml
N``: every label loses its components smaller than N mL. Removed voxels become background. nnU-Net
decides per label on its validation folds whether this helps; uniseg leaves the choice to the user
and writes what it removed (``postprocessing`` in the case record) so that a result says how it was
made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from uniseg_cli.errors import UsageError
from uniseg_cli.quality.anatomy import anatomy_of

ALL = "all"


@dataclass(frozen=True)
class PostProcessing:
    keep_largest: tuple[str, ...] = ()        # structure names (lower case), or ("all",)
    min_component_ml: float | None = None

    @property
    def active(self) -> bool:
        return bool(self.keep_largest) or self.min_component_ml is not None

    def keeps_largest(self, name: str) -> bool:
        return ALL in self.keep_largest or name.lower() in self.keep_largest

    def to_json(self) -> dict[str, Any]:
        return {"keep_largest": list(self.keep_largest), "min_component_ml": self.min_component_ml}


def parse_postprocessing(keep_largest: str | None, min_component_ml: float | None,
                         known_names: Sequence[str]) -> PostProcessing:
    """The options as given, checked against the model's label names."""
    names: tuple[str, ...] = ()
    if keep_largest:
        names = tuple(dict.fromkeys(n.strip().lower() for n in keep_largest.split(",") if n.strip()))
        known = {n.lower() for n in known_names}
        unknown = [n for n in names if n != ALL and n not in known]
        if unknown:
            raise UsageError(f"--keep-largest: no label {unknown[0]!r} in the model (labels: "
                             f"{', '.join(sorted(known))}, or all)")
    if min_component_ml is not None and min_component_ml <= 0:
        raise UsageError(f"--min-component-ml must be positive, got {min_component_ml:g}")
    return PostProcessing(names, min_component_ml)


@dataclass
class Removed:
    """Voxels each label lost, by name."""

    voxels: dict[str, int] = field(default_factory=dict)


def clean_map(label_map: np.ndarray, labels: Sequence[tuple[int, str]], voxel_ml: float,
              options: PostProcessing, removed: Removed) -> np.ndarray:
    """``label_map`` after the post-processing of ``options`` for its ``(value, name)`` labels."""
    from scipy import ndimage

    if not options.active or not label_map.any():
        return label_map
    out = label_map.copy()
    boxes = ndimage.find_objects(label_map)
    for value, name in labels:
        if value - 1 >= len(boxes) or boxes[value - 1] is None:
            continue
        box = boxes[value - 1]
        mask = label_map[box] == value
        components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
        if count == 0:
            continue
        sizes = np.bincount(components.ravel())[1:]
        keep = np.ones(count, dtype=bool)
        if options.keeps_largest(name):
            pieces = anatomy_of(name).pieces or 1
            keep[:] = False
            keep[np.argsort(sizes)[::-1][:pieces]] = True
        if options.min_component_ml is not None:
            keep &= sizes * voxel_ml >= options.min_component_ml
        if keep.all():
            continue
        drop = np.concatenate([[False], ~keep])[components]
        region = out[box]
        region[drop] = 0
        removed.voxels[name] = removed.voxels.get(name, 0) + int(drop.sum())
    return out


def apply_postprocessing(prediction: Any, voxel_ml: float, options: PostProcessing) -> tuple[Any, Removed]:
    """The ``Prediction`` with its merged map and every per-task map post-processed."""
    removed = Removed()
    if not options.active:
        return prediction, removed
    labels = [(label.value, label.name) for label in prediction.legend]
    merged = clean_map(prediction.labels, labels, voxel_ml, options, removed)
    tasks = {}
    for key, task_map in prediction.tasks.items():
        own = [(label.value - prediction.offsets.get(key, 0), label.name) for label in prediction.legend
               if label.task == key]
        tasks[key] = clean_map(task_map, own, voxel_ml, options, Removed())
    return replace(prediction, labels=merged, tasks=tasks), removed
