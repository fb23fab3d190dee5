"""Quality flags: which results need a look, each a stable code with a one-line reason.

``FLAGS`` is the table of codes (adding a kind of flag edits it and ``structure_flags``); the case
record carries each label's and region's flags and the case's own, and ``predict --fail-on CODE,...``
makes a flagged case count as failed. Thresholds and definitions: docs/quality.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from uniseg_cli.errors import UsageError
from uniseg_cli.quality.anatomy import anatomy_of

#: The largest ``pieces`` connected components of a structure must hold this share of its voxels.
WHOLE_SHARE = 0.9
#: ``low_confidence``: a mean probability inside the label below this, or more than ``LOW_SHARE`` of
#: its voxels below ``confidence.CONFIDENT``.
LOW_MEAN = 0.8
LOW_SHARE = 0.5
_AXES = ("left-right", "anterior-posterior", "superior-inferior")


@dataclass(frozen=True)
class FlagKind:
    code: str
    scope: str    # "structure" (a label or region) or "case"
    meaning: str


FLAGS: dict[str, FlagKind] = {k.code: k for k in (
    FlagKind("missing", "structure", "a structure every scan of the task holds is empty"),
    FlagKind("volume", "structure", "the volume lies outside the plausible adult range (uniseg_cli.quality.anatomy)"),
    FlagKind("border", "structure", "the structure touches the border of the field of view: cut off, its volume "
                                    "and statistics incomplete"),
    FlagKind("fragmented", "structure", "the structure is in more pieces than it has, its largest holding less "
                                        f"than {WHOLE_SHARE:.0%} of its voxels"),
    FlagKind("low_confidence", "structure", f"mean probability below {LOW_MEAN} or more than {LOW_SHARE:.0%} of "
                                            "the voxels below the confidence threshold (needs --uncertainty)"),
    FlagKind("input_override", "case", "the scan failed an input plausibility check and was segmented with "
                                       "--accept-implausible"),
)}


def parse_fail_on(text: str | None) -> frozenset[str]:
    """``--fail-on border,missing`` (or ``any``) → the codes that fail a case."""
    if not text:
        return frozenset()
    codes = [c.strip().lower() for c in text.split(",") if c.strip()]
    if "any" in codes:
        return frozenset(FLAGS)
    unknown = [c for c in codes if c not in FLAGS]
    if unknown:
        raise UsageError(f"--fail-on: unknown flag {unknown[0]!r} (flags: {', '.join(FLAGS)}, or any)")
    return frozenset(codes)


def flag(code: str, reason: str) -> dict[str, str]:
    assert code in FLAGS, code
    return {"code": code, "reason": reason}


class MapGeometry:
    """What the structure flags need of a label map, computed once per map: voxel counts, which values
    touch each face of the volume, each value's bounding box."""

    def __init__(self, label_map: np.ndarray, axis_world: Sequence[int]) -> None:
        from scipy import ndimage

        self.map = label_map
        self.axis_world = tuple(axis_world)
        self.faces: list[tuple[int, str, np.ndarray]] = []
        for axis in range(3):
            for end, index in (("first", 0), ("last", -1)):
                face = np.take(label_map, index, axis=axis)
                self.faces.append((axis, end, np.bincount(face.ravel(), minlength=256) > 0))
        self.boxes = ndimage.find_objects(label_map) if label_map.any() else []

    def touching(self, values: Sequence[int]) -> str:
        """Which faces of the volume the values reach, in words ("" for none)."""
        ends: dict[int, list[str]] = {}
        for axis, end, hit in self.faces:
            if hit[list(values)].any():
                ends.setdefault(axis, []).append(end)
        return ", ".join(f"{' and '.join(e)} slice{'s' if len(e) > 1 else ''} along {_AXES[self.axis_world[a]]}"
                         for a, e in ends.items())

    def pieces(self, values: Sequence[int]) -> np.ndarray:
        """Voxel counts of the connected components (26-connected) of ``values``, largest first."""
        from scipy import ndimage

        boxes = [self.boxes[v - 1] for v in values if v - 1 < len(self.boxes) and self.boxes[v - 1] is not None]
        if not boxes:
            return np.zeros(0, dtype=np.int64)
        box = tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3))
        mask = np.isin(self.map[box], list(values))
        components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
        sizes = np.bincount(components.ravel())[1:]
        return np.sort(sizes)[::-1]


def structure_flags(name: str, values: Sequence[int], voxels: int, volume_ml: float, where: MapGeometry,
                    confidence: dict[str, Any] | None) -> list[dict[str, str]]:
    """The flags of one label or region (its ``values`` in the map) against ``uniseg_cli.quality.anatomy``."""
    anatomy = anatomy_of(name)
    if voxels == 0:
        return [flag("missing", f"{name} is empty")] if anatomy.expected else []
    flags = []
    if anatomy.volume_ml is not None:
        low, high = anatomy.volume_ml
        if not low <= volume_ml <= high:
            flags.append(flag("volume", f"{name} {volume_ml:g} mL, outside the plausible adult {low:g}-{high:g} mL "
                                        f"({anatomy.source})"))
    faces = where.touching(values)
    if faces:
        flags.append(flag("border", f"{name} touches the border of the scan ({faces}): cut off"))
    if anatomy.pieces is not None:
        sizes = where.pieces(values)
        held = float(sizes[:anatomy.pieces].sum()) / max(1, int(sizes.sum()))
        if len(sizes) > anatomy.pieces and held < WHOLE_SHARE:
            largest = "the largest holds" if anatomy.pieces == 1 else f"the largest {anatomy.pieces} hold"
            flags.append(flag("fragmented", f"{name} in {len(sizes)} pieces, {largest} {held:.0%} of its voxels"))
    if confidence is not None and confidence.get("mean_probability") is not None:
        mean, share = confidence["mean_probability"], confidence["share_below"]
        if mean < LOW_MEAN or share > LOW_SHARE:
            flags.append(flag("low_confidence", f"{name}: mean probability {mean:.2f}, {share:.0%} of its voxels "
                                                f"below {confidence['threshold']}"))
    return flags


def case_flags(structures: Sequence[dict[str, Any]], accepted: Sequence[Any]) -> list[dict[str, str]]:
    """The case's flags: its own (an accepted implausible input) and every structure's, each naming it."""
    flags = [dict(flag("input_override", f"{f.line()} (accepted)"), label=None) for f in accepted]
    for record in structures:
        flags += [dict(f, label=record["name"]) for f in record.get("flags", ())]
    return flags
