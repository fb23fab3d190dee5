"""Intensity statistics inside each label, in the input's units (HU for CT), on the input's grid.

Computed on channel 0 as it was read (no resampling, no normalisation), so that they agree with what
a viewer shows; the bounding box is in LPS millimetres (voxel centres), as DICOM states positions.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uniseg_cli.io.atomic import write_text
from uniseg_cli.io.images import Geometry

log = logging.getLogger(__name__)

STATISTICS = ("mean", "std", "median", "min", "max", "p5", "p95")


def voxel_to_lps(geometry: Geometry, indices_zyx: np.ndarray) -> np.ndarray:
    """LPS millimetres of voxel centres given as (z, y, x) index rows."""
    direction = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    ijk = np.asarray(indices_zyx, dtype=float)[:, ::-1] * np.asarray(geometry.spacing[::-1])
    return ijk @ direction.T + np.asarray(geometry.origin)


def label_intensities(intensity: np.ndarray, labels: np.ndarray, geometry: Geometry,
                      values: Sequence[int]) -> dict[int, dict[str, Any] | None]:
    """value → statistics of ``intensity`` (z, y, x) inside ``labels == value`` (None for an empty label)."""
    return {value: mask_intensities(intensity, labels == value, geometry) for value in values}


def mask_intensities(intensity: np.ndarray, mask: np.ndarray, geometry: Geometry) -> dict[str, Any] | None:
    """The statistics of ``intensity`` inside a boolean ``mask`` (a label, or a region's classes); None if empty."""
    if not mask.any():
        return None
    inside = intensity[mask].astype(np.float64)
    p5, median, p95 = np.percentile(inside, [5, 50, 95])
    low = np.array([np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[[0, -1]]
                    for axis in range(3)])                      # (axis, [first, last])
    corners = np.array(np.meshgrid(*low, indexing="ij")).reshape(3, -1).T
    lps = voxel_to_lps(geometry, corners)
    return {
        "mean": float(inside.mean()), "std": float(inside.std()), "median": float(median),
        "min": float(inside.min()), "max": float(inside.max()), "p5": float(p5), "p95": float(p95),
        "bbox_mm": {"min": [round(float(v), 3) for v in lps.min(axis=0)],
                    "max": [round(float(v), 3) for v in lps.max(axis=0)]},
    }


CSV_COLUMNS = ("case", "task", "value", "name", "voxels", "volume_ml", *STATISTICS,
               "bbox_min_x", "bbox_min_y", "bbox_min_z", "bbox_max_x", "bbox_max_y", "bbox_max_z")


def statistics_csv(records: Iterable[dict[str, Any]]) -> str:
    """One row per case and label (from ``--json`` records with statistics), for spreadsheets."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for record in records:
        # a region's row has the values it unites as its value ("1+2+3": whole tumour)
        rows = [(label, label["value"]) for label in record.get("labels") or []]
        rows += [(region, "+".join(map(str, region["values"]))) for region in record.get("regions") or []]
        for label, value in rows:
            stats = label.get("statistics") or {}
            box = stats.get("bbox_mm") or {"min": [""] * 3, "max": [""] * 3}
            writer.writerow([record["case"], label["task"], value, label["name"], label["voxels"],
                             label["volume_ml"], *(stats.get(s, "") for s in STATISTICS), *box["min"], *box["max"]])
    return buffer.getvalue()


def write_statistics_table(path: Path, plans: Sequence[Any], this_run: Mapping[str, dict[str, Any]]) -> None:
    """``--statistics-csv``: one table for every case of the batch (all shards), built from the case
    records on disk, so that a resumed run and the jobs of a sharded one keep every row. ``this_run``
    (case → ``--json`` record) stands in where there is no record (``--no-sidecar``). Jobs writing the
    same table take turns (a lock on its folder): the last one to finish writes every finished case."""
    from uniseg_cli.outputs.record import read_record

    with _folder_lock(path.parent):
        rows, missing = [], 0
        for plan in plans:
            record = read_record(plan.record) if plan.record is not None else None
            result = record.get("result") if record is not None else this_run.get(plan.case.name)
            if result is None or result.get("error") or not result.get("labels"):
                missing += 1
                continue
            rows.append(result)
        write_text(path, statistics_csv(rows))
    if missing:
        log.info("%s: %d case(s) of %d, %d not (yet) finished", path, len(rows), len(plans), missing)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` (flock on the folder itself: no lock file is left behind)."""
    try:
        import fcntl
    except ImportError:  # Windows: one job per table
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
