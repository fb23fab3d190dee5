"""3D Slicer's segmentation file (``.seg.nrrd``), written with slicerio, the Slicer project's library.

Slicer opens it as a segmentation node with each segment's name, colour and terminology (the same
SNOMED CT codes as the DICOM SEG), on the input's grid in LPS.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uniseg_cli.io.images import Geometry
from uniseg_cli.tasks import Code

_CONTEXT = "Segmentation category and type - DICOM master list"
_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


def ijk_to_lps(geometry: Geometry) -> np.ndarray:
    """The 4×4 matrix from voxel index (i, j, k) = (x, y, z) to LPS millimetres."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(geometry.direction, dtype=float).reshape(3, 3) * np.asarray(geometry.spacing[::-1])
    matrix[:3, 3] = geometry.origin
    return matrix


def _triple(code: Code) -> list[str]:
    return [code.scheme, code.value, code.meaning]


def write_seg_nrrd(path: Path, labels: np.ndarray, legend: Sequence[Any], geometry: Geometry, *,
                   segments: Sequence[Any] | None = None) -> None:
    """Every label of the legend as a segment (label value, name, colour 0–1, terminology entry). With
    ``segments`` (a region task's overlapping regions), each is a segment in the first of Slicer's
    layers where it overlaps no other, as Slicer stores overlapping segments."""
    import slicerio

    voxels = np.ascontiguousarray(labels.transpose(2, 1, 0))  # (z, y, x) → slicerio's (i, j, k)
    if segments is None:
        entries = [_segment(label.name, label.terms, id=f"Segment_{label.value}", labelValue=int(label.value), layer=0)
                   for label in legend]
        segmentation = {"voxels": voxels, "ijkToLPS": ijk_to_lps(geometry), "segments": entries}
    else:
        segmentation = slicerio.create_segmentation(voxels.shape, ijk_to_lps(geometry))
        for number, segment in enumerate(segments, start=1):
            slicerio.add_segment(segmentation, segment.mask(voxels),
                                 _segment(segment.name, segment.terms, id=f"Segment_{number}"))
    slicerio.write_segmentation(str(path), {
        **segmentation,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "encoding": "gzip",
    })


def _segment(name: str, terms: Any, **fields: Any) -> dict[str, Any]:
    terminology = {"contextName": _CONTEXT, "category": _triple(terms.category), "type": _triple(terms.type)}
    if terms.region is not None:
        terminology.update(anatomicContextName=_ANATOMIC_CONTEXT, anatomicRegion=_triple(terms.region))
    return {**fields, "name": name, "color": [round(c / 255, 6) for c in terms.colour], "terminology": terminology}
