"""The output formats of ``uniseg predict --output-format``: one table, one row per format.

Each row says the format's default file ending, the endings ``-o`` may have when it is the first
format, whether it references a DICOM series (and so needs one as input, and which packages), and the
function that writes a label map in it. Adding a format edits ``FORMATS`` only: the plan
(``uniseg_cli.outputs.plan``) names its files, the exporter (``uniseg_cli.outputs.export``) calls its
writer, the CLI lists it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniseg_cli.errors import UsageError
from uniseg_cli.io.images import IMAGE_ENDINGS, image_ending


@dataclass(frozen=True)
class Segment:
    """One structure a segmentation object carries: a class of a softmax task (one value of the map) or
    a region of a region task (the values of its classes; regions overlap)."""

    name: str
    task: str
    values: tuple[int, ...]
    terms: Any             # uniseg_cli.tasks.LabelTerms

    def mask(self, labels: Any) -> Any:
        import numpy as np

        return labels == self.values[0] if len(self.values) == 1 else np.isin(labels, self.values)


@dataclass(frozen=True)
class MapToWrite:
    """One label map as a writer gets it: the voxels on the input's grid, what each value means, and
    who made it (DICOM writers record the model and task)."""

    labels: Any            # numpy uint8 (z, y, x)
    legend: Sequence[Any]  # Label objects (value, name, task, terms)
    geometry: Any          # uniseg_cli.io.images.Geometry
    model: str
    task: str
    regions: Sequence[Any] = ()   # uniseg_cli.labels.Structure of region tasks, in this map's numbering

    @property
    def segments(self) -> list[Segment]:
        """What DICOM SEG, RTSTRUCT and seg.nrrd carry: each class of the softmax tasks, and for a region
        task its regions (whole tumour = every class it holds), not its disjoint classes."""
        region_tasks = {r.task for r in self.regions}
        return ([Segment(label.name, label.task, (label.value,), label.terms) for label in self.legend
                 if label.task not in region_tasks]
                + [Segment(r.name, r.task, tuple(r.values), r.terms) for r in self.regions])


def _write_nifti(tmp: Path, item: MapToWrite) -> None:
    from uniseg_cli.io.images import write_image_file

    write_image_file(tmp, item.labels, item.geometry, description=OUTPUT_MARK)


def _write_seg_nrrd(tmp: Path, item: MapToWrite) -> None:
    from uniseg_cli.outputs.slicer import write_seg_nrrd

    write_seg_nrrd(tmp, item.labels, item.legend, item.geometry, segments=item.segments if item.regions else None)


def _write_dicom_seg(tmp: Path, item: MapToWrite) -> None:
    from uniseg_cli.outputs.dicom import write_dicom_seg

    write_dicom_seg(tmp, item.labels, item.segments, item.geometry, model=item.model, task=item.task)


def _write_rtstruct(tmp: Path, item: MapToWrite) -> None:
    from uniseg_cli.outputs.dicom import write_rtstruct

    write_rtstruct(tmp, item.labels, item.segments, item.geometry, model=item.model, task=item.task)


@dataclass(frozen=True)
class OutputFormat:
    """One ``--output-format``.

    ending: the default file name's ending (``<case>_<task><ending>``).
    endings: what ``-o FILE`` may end in when this is the first format (None: every image ending).
    dicom_modules: the packages of the ``dicom`` extra it needs; non-empty means it references the
        source DICOM series and needs one as input.
    write: writes ``MapToWrite`` to a temporary path that keeps the destination's ending.
    """

    name: str
    ending: str
    endings: tuple[str, ...] | None
    write: Callable[[Path, MapToWrite], None]
    dicom_modules: tuple[str, ...] = ()

    @property
    def needs_dicom(self) -> bool:
        return bool(self.dicom_modules)

    def accepted_endings(self) -> tuple[str, ...]:
        return IMAGE_ENDINGS if self.endings is None else self.endings

    def ending_of(self, path: Path) -> str | None:
        """The ending of ``path`` this format accepts (longest first), or None."""
        if self.endings is None:
            return image_ending(path)
        name = path.name.lower()
        return next((e for e in sorted(self.endings, key=len, reverse=True) if name.endswith(e)), None)


#: Every output format, in the order the help lists them.
FORMATS: dict[str, OutputFormat] = {f.name: f for f in (
    OutputFormat("nifti", ".nii.gz", None, _write_nifti),
    OutputFormat("dicom-seg", ".dcm", (".dcm",), _write_dicom_seg, ("highdicom", "pydicom")),
    OutputFormat("rtstruct", "_rtstruct.dcm", ("_rtstruct.dcm", ".dcm"), _write_rtstruct, ("rt_utils", "pydicom")),
    OutputFormat("seg-nrrd", ".seg.nrrd", (".seg.nrrd",), _write_seg_nrrd),
)}

#: What uniseg writes into the header of its NIfTI (descrip) and ITK (metadata) label maps and
#: probabilities, so that a later run recognises them as outputs, not scans.
OUTPUT_MARK = "uniseg output"
DICOM_INSTALL_HINT = "pip install 'uniseg-cli[dicom]'"


@dataclass(frozen=True)
class OutputOptions:
    """What to write for each case beside (or instead of) the NIfTI label map.

    formats: the first names the file ``-o`` gives; the others get the same name with their own ending.
    sidecar: the case record ``<name>.json`` (label table, what was published, the ``--json`` record)
        and a label table beside every NIfTI label map; ``--skip-existing`` needs the record.
    statistics: intensity statistics of channel 0 inside each label in the results.
    preview: write a PNG preview (``preview_path`` for a single case, else ``<output>_preview.png``).
    split: one output per task (each in its own numbering) instead of the merged map.
    uncertainty: the uncertainty map beside the label map, per-label confidence in the record, the
        ``low_confidence`` flag; ``disagreement``: also the TTA disagreement map (set where TTA runs).
    """

    formats: tuple[str, ...] = ("nifti",)
    sidecar: bool = True
    statistics: bool = False
    preview: bool = False
    preview_path: Path | None = None
    split: bool = False
    uncertainty: bool = False
    disagreement: bool = False

    @property
    def needs_intensity(self) -> bool:
        return self.statistics or self.preview

    @property
    def needs_dicom(self) -> bool:
        return any(FORMATS[f].needs_dicom for f in self.formats)


def parse_formats(text: str) -> tuple[str, ...]:
    """``nifti``, ``dicom-seg,nifti``, …: the formats in order, each once."""
    formats = tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if not formats or unknown:
        raise UsageError(f"--output-format {text!r}: use one or more of {', '.join(FORMATS)} (comma-separated)")
    return formats


def accepted_endings(fmt: str) -> tuple[str, ...]:
    """The endings ``-o FILE`` may have when ``fmt`` is the first format."""
    return FORMATS[fmt].accepted_endings()


def file_ending(path: Path, fmt: str) -> str | None:
    """The ending of ``path`` that ``fmt`` accepts, or None."""
    return FORMATS[fmt].ending_of(path)


def stem(path: Path, fmt: str) -> str:
    """``path``'s name without the ending ``fmt`` gave it."""
    ending = file_ending(path, fmt) or ""
    return path.name[: len(path.name) - len(ending)] if ending else path.name


def sibling(primary: Path, primary_format: str, fmt: str) -> Path:
    """The file of ``fmt`` beside the primary output: the same name with ``fmt``'s ending."""
    return primary.with_name(stem(primary, primary_format) + FORMATS[fmt].ending)


def check_options(options: OutputOptions, inputs_are_dicom: Sequence[bool]) -> None:
    """Refuse, before any work, DICOM formats for cases that are not DICOM series, and DICOM formats
    whose packages are not installed (a usage error, not a failure found after inference)."""
    wanted = [f for f in options.formats if FORMATS[f].needs_dicom]
    if wanted and not all(inputs_are_dicom):
        raise UsageError(f"--output-format {', '.join(wanted)} references the source DICOM series (study, series, "
                         "frame of reference, each slice), so it needs DICOM series inputs; for other inputs use "
                         "nifti or seg-nrrd")
    import importlib

    for fmt in wanted:
        for module in FORMATS[fmt].dicom_modules:
            try:
                importlib.import_module(module)
            except ImportError:
                raise UsageError(f"--output-format {fmt} needs the {module.split('.')[0]} package: "
                                 f"{DICOM_INSTALL_HINT}") from None
