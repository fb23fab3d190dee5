"""DICOM outputs that point back at the series they segment: Segmentation (highdicom) and RT
Structure Set (rt-utils).

highdicom is the maintained implementation of the DICOM SEG IOD (TotalSegmentator, MONAI Deploy and
MONAI Label write with it); rt-utils turns masks into per-slice contours, which an RTSTRUCT must hold
and highdicom does not write. Frame ``k`` of the label map is slice ``k`` of the series as the reader
stacked it (``Geometry.dicom_files``), so every frame references its own source image.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uniseg_cli import __version__
from uniseg_cli.errors import UnisegError
from uniseg_cli.io.images import Geometry
from uniseg_cli.outputs.formats import Segment
from uniseg_cli.tasks import Code

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'uniseg-cli[dicom]'"


def _need(module: str, fmt: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UnisegError(f"--output-format {fmt} needs the {module.split('.')[0]} package: {INSTALL_HINT}") from None


def check_references(geometry: Geometry) -> None:
    """Refuse, before inference, a series whose slices lack what a derived object must reference."""
    _sources(geometry)


def _sources(geometry: Geometry) -> list[Any]:
    import pydicom

    if not geometry.dicom_files:
        raise UnisegError(f"{geometry.source}: not a DICOM series; DICOM outputs reference their source images")
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in geometry.dicom_files]
    for path, ds in zip(geometry.dicom_files, sources):
        missing = [name for name in REFERENCED if not str(ds.get(name, "") or "").strip()]
        if missing:  # an object referencing empty UIDs would point at nothing in PACS
            raise UnisegError(f"{path}: has no {', '.join(missing)} (anonymised without new UIDs?); a DICOM "
                              "output must reference them")
    return sources


def character_set(source: Any) -> str | list[str] | None:
    """The Specific Character Set a derived object is written with, from its source image's: scanners
    write it empty (the default repertoire), as one value (ISO_IR 100, ISO_IR 192, GB18030) or with code
    extensions (ISO 2022 IR 6 \\ ISO 2022 IR 100). highdicom refuses the empty value; pydicom has decoded
    the source's names already, so a value highdicom does not know is written as UTF-8 (ISO_IR 192)."""
    from highdicom.enum import SpecificCharacterSetValues

    raw = source.get("SpecificCharacterSet")
    values = [] if raw is None else [str(v).strip() for v in ([raw] if isinstance(raw, str) else list(raw))]
    if len(values) > 1 and values[0] == "":
        values[0] = "ISO 2022 IR 6"          # the default repertoire, with code extensions
    values = [v for v in values if v]
    if not values or values == ["ISO_IR 6"]:
        return None                           # the default repertoire: no attribute needed
    try:
        for value in values:
            SpecificCharacterSetValues(value)
    except ValueError:
        return "ISO_IR 192"
    return values[0] if len(values) == 1 else values


#: What a derived object references; anonymisers that blank them leave nothing to point at.
REFERENCED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


def _present(labels: np.ndarray, segments: Sequence[Segment]) -> list[Segment]:
    """The segments with voxels (a SEG segment or an ROI without any would be an empty promise); all of
    them when the map is empty, so that the object still says what was looked for."""
    counts = np.bincount(labels.ravel(), minlength=256)
    present = [s for s in segments if counts[list(s.values)].sum() > 0]
    return present or list(segments)


def write_dicom_seg(path: Path, labels: np.ndarray, segments: Sequence[Segment], geometry: Geometry, *,
                    model: str, task: str) -> None:
    """A binary DICOM Segmentation with one segment per structure (segment numbers 1…N in order, its
    name, SNOMED CT category/type, anatomic region for tumours, display colour). A region task's regions
    are segments that overlap (whole tumour holds the core), which a binary SEG allows."""
    hd = _need("highdicom", "dicom-seg")
    from pydicom.sr.codedict import codes

    sources = _sources(geometry)
    segments = _present(labels, segments)
    algorithm = hd.AlgorithmIdentificationSequence(name="UniSeg", family=codes.cid7162.ArtificialIntelligence,
                                                   version=__version__, source=model)

    def coded(code: Code) -> Any:
        return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)

    descriptions = []
    for number, label in enumerate(segments, start=1):
        terms = label.terms
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=label.name[:64],
            segmented_property_category=coded(terms.category), segmented_property_type=coded(terms.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            tracking_uid=hd.UID(), tracking_id=f"{label.task}/{label.name}",
            anatomic_regions=[coded(terms.region)] if terms.region is not None else None,
            display_color=hd.color.CIELabColor.from_rgb(*terms.colour)))
    if all(len(s.values) == 1 for s in segments):   # disjoint: one frame stack of segment numbers
        numbers = np.zeros(256, dtype=np.uint8)
        for number, segment in enumerate(segments, start=1):
            numbers[segment.values[0]] = number
        frames = numbers[labels]
    else:                                            # overlapping: one binary stack per segment
        frames = np.stack([s.mask(labels) for s in segments], axis=-1)
    empty = not frames.any()
    with warnings.catch_warnings(record=True) as caught:  # about the source's own attributes (a one-part
        warnings.simplefilter("always")                     # patient name, say): nothing a user can act on
        seg = _segmentation(hd, sources, frames, descriptions, model=model, task=task, empty=empty)
    for warning in caught:
        log.debug("highdicom: %s", warning.message)
    seg.save_as(str(path))


def _segmentation(hd: Any, sources: list[Any], frames: np.ndarray, descriptions: list[Any], *, model: str,
                  task: str, empty: bool) -> Any:
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=_series_number(sources),
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="uniseg",
        manufacturer_model_name=f"UniSeg ({model})", software_versions=__version__, device_serial_number="none",
        series_description=f"uniseg {task}"[:64], content_label="UNISEG", content_description=f"UniSeg {task}"[:64],
        content_creator_name="uniseg^", omit_empty_frames=not empty,
        specific_character_set=character_set(sources[0]))


def write_rtstruct(path: Path, labels: np.ndarray, segments: Sequence[Segment], geometry: Geometry, *,
                   model: str, task: str) -> None:
    """An RT Structure Set with one ROI per structure (name, colour; a region task's regions, which
    overlap), contoured slice by slice."""
    rt_utils = _need("rt_utils", "rtstruct")
    from rt_utils import ds_helper, image_helper

    sources = _sources(geometry)
    # rt-utils would read the folder itself (recursively) and place every slice on an evenly spaced grid
    # from the first one; it is given the slices the label map was stacked from instead, and each
    # contour is then moved onto its own slice's position (below), as the SEG's frames are.
    structure = rt_utils.RTStruct(sources, ds_helper.create_rtstruct_dataset(sources))
    for label in _present(labels, segments):
        mask = np.ascontiguousarray(label.mask(labels).transpose(1, 2, 0))   # (rows, columns, slices)
        structure.add_roi(mask=mask, color=list(label.terms.colour), name=label.name,
                          description=f"UniSeg {task} ({model})"[:64], roi_generation_algorithm="AUTOMATIC")
    _onto_own_slices(structure.ds, sources, image_helper)
    ds, first = structure.ds, sources[0]
    # what rt-utils leaves out and the IOD requires (dciodvfy): Type 2 study attributes, the frame of reference
    ds.ReferringPhysicianName = first.get("ReferringPhysicianName", "")
    ds.AccessionNumber = first.get("AccessionNumber", "")
    ds.OperatorsName = ""
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    ds.SeriesDescription = f"uniseg {task}"[:64]
    ds.StructureSetLabel = "UNISEG"
    ds.Manufacturer = "uniseg"
    ds.ManufacturerModelName = f"UniSeg ({model})"[:64]
    ds.SoftwareVersions = __version__
    charset = character_set(first)
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.save_as(str(path))  # not structure.save(): it prints to stdout, which carries data only


def _onto_own_slices(ds: Any, sources: Sequence[Any], image_helper: Any) -> None:
    """Put every contour from where rt-utils' evenly spaced grid put it to its referenced slice's own
    Image Position (Patient): the same in-plane pixels, the slice's true position (they differ where a
    series has gaps, uneven spacing or shifted slices, accepted with --allow-gaps)."""
    grid = np.asarray(image_helper.get_pixel_to_patient_transformation_matrix(list(sources)), dtype=float)
    slot = {str(s.SOPInstanceUID): k for k, s in enumerate(sources)}
    for roi in ds.ROIContourSequence:
        for contour in getattr(roi, "ContourSequence", []):
            k = slot[str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)]
            offset = np.asarray(sources[k].ImagePositionPatient, dtype=float) - (grid @ [0.0, 0.0, k, 1.0])[:3]
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3) + offset
            # 0.1 µm steps: a decimal string (DS) holds at most 16 characters, rt-utils writes floats' repr
            contour.ContourData = [round(float(v), 4) for v in points.ravel()]


def _series_number(sources: Sequence[Any]) -> int:
    """One above the source series' number, as scanners number derived series."""
    try:
        return int(sources[0].SeriesNumber) + 1000
    except (AttributeError, TypeError, ValueError):
        return 1000
