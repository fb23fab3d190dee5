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


def write_seg_nrrd(path: Path, labels: np.ndarray, legend: Sequence[Any], geometry: Geometry) -> None:
    """Every label of the legend as a segment (label value, name, colour 0–1, terminology entry)."""
    import slicerio

    segments = []
    for label in legend:
        terms = label.terms
        terminology = {"contextName": _CONTEXT, "category": _triple(terms.category), "type": _triple(terms.type)}
        if terms.region is not None:
            terminology.update(anatomicContextName=_ANATOMIC_CONTEXT, anatomicRegion=_triple(terms.region))
        segments.append({"id": f"Segment_{label.value}", "labelValue": int(label.value), "layer": 0,
                         "name": label.name, "color": [round(c / 255, 6) for c in terms.colour],
                         "terminology": terminology})
    slicerio.write_segmentation(str(path), {
        "voxels": np.ascontiguousarray(labels.transpose(2, 1, 0)),  # (z, y, x) → slicerio's (i, j, k)
        "ijkToLPS": ijk_to_lps(geometry),
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "encoding": "gzip",
        "segments": segments,
    })
