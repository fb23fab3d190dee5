"""``uniseg evaluate``: Dice, HD95 and normalised surface Dice of label maps, in millimetres.

Distances come from scipy's exact Euclidean distance transform with the images' spacing. A label's
surface is its voxels that touch a voxel outside it (6-neighbourhood; the image border counts as
outside). HD95 is the larger of the two directed 95th percentiles of surface-to-surface distance (as
MONAI computes it); the normalised surface Dice (Nikolov et al. 2021) is the fraction of both surfaces'
voxels lying within the tolerance of the other surface.

Empty masks (the convention, stated once here and in the README):
- reference and prediction both empty: Dice 1, NSD 1, HD95 0 (nothing to find, nothing found);
- exactly one empty: Dice 0, NSD 0, HD95 undefined (``None``; left out of the mean, counted in ``n``).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uniseg_cli.data.preprocessing import nonzero_bbox
from uniseg_cli.errors import UnisegError, UsageError
from uniseg_cli.io.images import IMAGE_ENDINGS, Geometry, read_image, strip_ending

log = logging.getLogger(__name__)

METRICS = ("dice", "hd95", "nsd")


@dataclass(frozen=True)
class LabelScore:
    label: int | str  # a label value, or a region's name
    dice: float
    hd95: float | None
    nsd: float
    reference_voxels: int
    predicted_voxels: int


@dataclass
class CaseScores:
    case: str
    prediction: str
    reference: str
    labels: list[LabelScore] = field(default_factory=list)


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a 6-neighbour outside it (or on the image border)."""
    from scipy import ndimage

    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)
    return mask & ~eroded


def _distances_to(target_surface: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance (mm) of every voxel to the nearest voxel of ``target_surface``."""
    from scipy import ndimage

    return ndimage.distance_transform_edt(~target_surface, sampling=spacing)


def score_label(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float], tolerance: float,
                label: int = 1) -> LabelScore:
    """The three metrics of one label (masks of any dtype; non-zero is inside)."""
    p, r = prediction.astype(bool), reference.astype(bool)
    np_, nr = int(p.sum()), int(r.sum())
    if np_ == 0 and nr == 0:
        return LabelScore(label, 1.0, 0.0, 1.0, 0, 0)
    if np_ == 0 or nr == 0:
        return LabelScore(label, 0.0, None, 0.0, nr, np_)
    dice = 2 * int((p & r).sum()) / (np_ + nr)
    # Surfaces and distances inside the box of both masks give exactly the whole image's values (a masked
    # voxel on the box's side has its outer neighbour outside both masks, as the border convention treats
    # the image's edge; every surface voxel a distance can end on lies in the box), and an organ in a whole
    # CT then costs its box, not the scan (distance transforms of a 512×512×600 image take seconds each).
    box = nonzero_bbox((p | r)[None])
    sp, sr = surface(p[box]), surface(r[box])
    p_to_r = _distances_to(sr, spacing)[sp]
    r_to_p = _distances_to(sp, spacing)[sr]
    hd95 = max(float(np.percentile(p_to_r, 95)), float(np.percentile(r_to_p, 95)))
    nsd = (int((p_to_r <= tolerance).sum()) + int((r_to_p <= tolerance).sum())) / (p_to_r.size + r_to_p.size)
    return LabelScore(label, dice, hd95, nsd, nr, np_)


Regions = Sequence[tuple[str, Sequence[int]]]


def parse_regions(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """``whole=1,2,3;core=2,3;enhancing=3`` → named regions (sets of label values)."""
    regions = []
    for part in (p.strip() for p in text.split(";") if p.strip()):
        name, _, values = part.rpartition("=")
        try:
            region = tuple(sorted({int(v) for v in values.split(",") if v.strip()}))
        except ValueError:
            region = ()
        if not name.strip() or not region or min(region) < 1:
            raise UsageError(f"--regions {text!r}: expected NAME=V,V,…;NAME=V,… with label values ≥ 1, "
                             "e.g. whole=1,2,3;core=2,3;enhancing=3")
        regions.append((name.strip(), region))
    if not regions:
        raise UsageError(f"--regions {text!r}: no regions")
    return regions


def evaluate_case(prediction: Path, reference: Path, *, labels: Sequence[int] | None, tolerance: float,
                  regions: Regions = ()) -> CaseScores:
    """Score one prediction file against its reference on the same grid."""
    pred, pred_geometry = read_label_map(prediction)
    ref, ref_geometry = read_label_map(reference)
    if not pred_geometry.same_grid(ref_geometry):
        raise UnisegError(f"{prediction}: not on the reference's grid: it {pred_geometry.difference(ref_geometry, str(reference))}")
    return score_arrays(_case_name(reference), str(prediction), str(reference), pred, ref, pred_geometry.spacing,
                        labels, tolerance, regions=regions)


def read_label_map(path: Path) -> tuple[np.ndarray, Geometry]:
    """A label map as ``(z, y, x)`` int64, refusing what is not one: scoring a probability map (4-D) or a
    float map (0.5 would be cast to 0 and score as a perfect match) would give a plausible wrong number."""
    data, geometry = read_image(path, nan_to_zero=False)
    if data.shape[0] != 1:
        raise UnisegError(f"{path}: has {data.shape[0]} channels (a probability map?); evaluate takes label maps, "
                          "one integer value per voxel")
    values = data[0]
    bad = ~np.isfinite(values) | (values != np.round(values)) | (values < 0)
    if bad.any():
        example = values[bad].flat[0]
        raise UnisegError(f"{path}: {int(bad.sum())} voxel(s) are not non-negative integers (e.g. {example:g}); "
                          "evaluate takes label maps, not probabilities or intensities")
    return values.astype(np.int64), geometry


def score_arrays(case: str, prediction_name: str, reference_name: str, prediction: np.ndarray, reference: np.ndarray,
                 spacing: Sequence[float], labels: Sequence[int] | None, tolerance: float,
                 regions: Regions = ()) -> CaseScores:
    """Score two label arrays on one grid (``labels`` default: every non-zero value in either); with
    ``regions``, each named region (the voxels holding any of its values) instead, as BraTS is scored."""
    scores = CaseScores(case, prediction_name, reference_name)
    if regions:
        for name, values in regions:
            scores.labels.append(score_label(np.isin(prediction, values), np.isin(reference, values), spacing,
                                             tolerance, name))
        return scores
    chosen = list(labels) if labels else sorted((set(np.unique(reference)) | set(np.unique(prediction))) - {0})
    for label in chosen:
        scores.labels.append(score_label(prediction == label, reference == label, spacing, tolerance, int(label)))
    return scores


def _probabilities(path: Path) -> bool:
    """Whether ``path`` is a probability map ``predict --save-probabilities nifti`` wrote (by its header)."""
    from uniseg_cli.io.images import image_description
    from uniseg_cli.outputs.formats import OUTPUT_MARK

    return image_description(path) == f"{OUTPUT_MARK} probabilities"


def _case_name(path: Path) -> str:
    return Path(strip_ending(path)).name


def pair_files(prediction: Path, reference: Path, *, task: str | None = None) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """File pairs, and the predictions no reference matched: two files, or two folders matched by case
    name (a prediction named ``CASE_<task>`` also matches ``CASE``, as ``uniseg predict`` names its outputs;
    with ``task`` only ``CASE_<task>``). Probability maps ``predict`` wrote beside its label maps are not
    predictions to score."""
    if prediction.is_file() and reference.is_file():
        return [(prediction, reference)], []
    if not (prediction.is_dir() and reference.is_dir()):
        for path in (prediction, reference):
            if not path.exists():
                raise UsageError(f"{path}: no such file or folder")
        raise UsageError(f"{prediction}, {reference}: give two files or two folders")
    def images(folder: Path) -> dict[str, Path]:
        return {_case_name(p): p for p in sorted(folder.iterdir()) if p.is_file() and p.name.endswith(IMAGE_ENDINGS)}
    predictions, references = images(prediction), images(reference)
    predictions = {name: p for name, p in predictions.items() if not _probabilities(p)}
    if task is not None:
        predictions = {name: p for name, p in predictions.items() if name.endswith(f"_{task}")}
        if not predictions:
            raise UsageError(f"{prediction}: no prediction named CASE_{task} (--task {task})")
    if not references:
        raise UsageError(f"{reference}: no label maps ({', '.join(IMAGE_ENDINGS)})")
    pairs = []
    for case, ref_path in references.items():
        match = predictions.get(case)
        if match is None:
            candidates = [p for name, p in predictions.items() if name.startswith(case + "_")]
            if len(candidates) > 1:
                raise UsageError(f"{reference / ref_path.name}: several predictions match case {case!r} "
                                 f"({', '.join(p.name for p in candidates)}; --split maps?): pick one task's with "
                                 f"--task, e.g. --task {_case_name(candidates[0])[len(case) + 1:]}")
            match = candidates[0] if candidates else None
        if match is None:
            raise UsageError(f"{prediction}: no prediction for case {case!r} (expected {case}.nii.gz or {case}_<task>.nii.gz)")
        pairs.append((match, ref_path))
    matched = {p for p, _ in pairs}
    return pairs, [p for p in predictions.values() if p not in matched]


def summarise(cases: Sequence[CaseScores]) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """Mean, standard deviation and count of each metric per label or region (undefined values left out)."""
    seen = list(dict.fromkeys(s.label for c in cases for s in c.labels))
    labels = sorted(seen) if all(isinstance(label, int) for label in seen) else seen  # regions: in their order
    summary: dict[str, dict[str, dict[str, float | int | None]]] = {}
    for label in labels:
        scores = [s for c in cases for s in c.labels if s.label == label]
        summary[str(label)] = {}
        for metric in METRICS:
            values = [getattr(s, metric) for s in scores if getattr(s, metric) is not None]
            summary[str(label)][metric] = {
                "mean": float(np.mean(values)) if values else None,
                "std": float(np.std(values)) if values else None,
                "n": len(values),
            }
    return summary


def evaluate(prediction: str | Path, reference: str | Path, *, labels: Sequence[int] | None = None,
             tolerance: float = 1.0, regions: Regions = (), task: str | None = None) -> dict[str, Any]:
    """Every case and the summary, as the JSON ``uniseg evaluate --json`` prints. ``task`` picks the
    ``CASE_<task>`` predictions of a folder holding several tasks' maps (``predict --split``)."""
    if not tolerance > 0:
        raise UsageError(f"--tolerance must be positive (mm), got {tolerance}")
    pairs, unmatched = pair_files(Path(prediction), Path(reference), task=task)
    for path in unmatched:
        log.warning("%s: no reference for this prediction in %s; not scored", path, reference)
    cases = [evaluate_case(p, r, labels=labels, tolerance=tolerance, regions=regions) for p, r in pairs]
    if labels:  # a value in no map at all would score Dice 1 everywhere: a typo, not a result
        absent = [v for v in labels if all(s.reference_voxels == 0 and s.predicted_voxels == 0
                                           for c in cases for s in c.labels if s.label == v)]
        if absent:
            raise UsageError(f"--labels {', '.join(map(str, absent))}: no voxel has this value in any prediction or "
                             f"reference ({len(cases)} case(s)); nothing to score")
    return report(cases, tolerance, unmatched=unmatched)


def report(cases: Sequence[CaseScores], tolerance: float, *, unmatched: Sequence[Path] = ()) -> dict[str, Any]:
    """The JSON of ``uniseg evaluate``; ``unmatched_predictions`` lists what was not scored, so that a
    summary over fewer cases than predicted is visible as such."""
    return {
        "tolerance_mm": tolerance,
        "cases": [{"case": c.case, "prediction": c.prediction, "reference": c.reference,
                   "labels": {str(s.label): _label_json(s) for s in c.labels}} for c in cases],
        "summary": summarise(cases),
        "unmatched_predictions": [str(p) for p in unmatched],
    }


def _label_json(score: LabelScore) -> dict[str, Any]:
    return {"dice": _round(score.dice), "hd95": _round(score.hd95), "nsd": _round(score.nsd),
            "reference_voxels": score.reference_voxels, "predicted_voxels": score.predicted_voxels}


def _round(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 6)


def to_csv(result: dict[str, Any]) -> str:
    """One row per case and label, then the per-label mean and std rows (case ``mean``/``std``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "label", "dice", "hd95_mm", "nsd", "reference_voxels", "predicted_voxels"])
    for case in result["cases"]:
        for label, s in case["labels"].items():
            writer.writerow([case["case"], label, s["dice"], s["hd95"], s["nsd"], s["reference_voxels"], s["predicted_voxels"]])
    for statistic in ("mean", "std"):
        for label, metrics in result["summary"].items():
            writer.writerow([statistic, label, *(_round(metrics[m][statistic]) for m in METRICS), "", ""])
    return buffer.getvalue()
