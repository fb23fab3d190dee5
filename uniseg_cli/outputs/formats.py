"""The output formats of ``uniseg predict --output-format`` and the file names they get."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from uniseg_cli.errors import UsageError
from uniseg_cli.io.images import IMAGE_ENDINGS, image_ending

#: format → the ending of its default file name (a label map takes the ending of -o, NIfTI by default)
FORMATS: dict[str, str] = {"nifti": ".nii.gz", "dicom-seg": ".dcm", "rtstruct": "_rtstruct.dcm",
                           "seg-nrrd": ".seg.nrrd"}
#: formats that reference the source DICOM series, so they need a DICOM input
DICOM_FORMATS = ("dicom-seg", "rtstruct")


@dataclass(frozen=True)
class OutputOptions:
    """What to write for each case beside (or instead of) the NIfTI label map.

    formats: the first names the file ``-o`` gives and ``--skip-existing`` looks at; the others get the
        same name with their own ending.
    sidecar: ``<name>.json`` label table beside NIfTI label maps.
    statistics: intensity statistics of channel 0 inside each label in the results.
    preview: write a PNG preview (``preview_path`` for a single case, else ``<output>_preview.png``).
    split: one output per task (each in its own numbering) instead of the merged map.
    """

    formats: tuple[str, ...] = ("nifti",)
    sidecar: bool = True
    statistics: bool = False
    preview: bool = False
    preview_path: Path | None = None
    split: bool = False

    @property
    def needs_intensity(self) -> bool:
        return self.statistics or self.preview

    @property
    def needs_dicom(self) -> bool:
        return any(f in DICOM_FORMATS for f in self.formats)


def parse_formats(text: str) -> tuple[str, ...]:
    """``nifti``, ``dicom-seg,nifti``, …: the formats in order, each once."""
    formats = tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if not formats or unknown:
        raise UsageError(f"--output-format {text!r}: use one or more of {', '.join(FORMATS)} (comma-separated)")
    return formats


def accepted_endings(fmt: str) -> tuple[str, ...]:
    """The endings ``-o FILE`` may have when ``fmt`` is the first format."""
    if fmt == "nifti":
        return IMAGE_ENDINGS
    return tuple(dict.fromkeys((FORMATS[fmt], ".dcm"))) if fmt in DICOM_FORMATS else (FORMATS[fmt],)


def file_ending(path: Path, fmt: str) -> str | None:
    """The ending of ``path`` that ``fmt`` accepts, or None."""
    name = path.name.lower()
    if fmt == "nifti":
        return image_ending(path)
    return next((e for e in sorted(accepted_endings(fmt), key=len, reverse=True) if name.endswith(e)), None)


def sibling(primary: Path, primary_format: str, fmt: str) -> Path:
    """The file of ``fmt`` beside the primary output: the same name with ``fmt``'s ending."""
    ending = file_ending(primary, primary_format) or ""
    stem = primary.name[: len(primary.name) - len(ending)] if ending else primary.name
    return primary.with_name(stem + FORMATS[fmt])


def output_files(primary: Path, options: OutputOptions) -> dict[str, Path]:
    """format → path of every file a label map is written as."""
    first = options.formats[0]
    return {fmt: primary if fmt == first else sibling(primary, first, fmt) for fmt in options.formats}


def sidecar_path(label_map: Path) -> Path:
    """``k.nii.gz`` → ``k.json``: the label table beside a label map image."""
    ending = image_ending(label_map) or ""
    return label_map.with_name(label_map.name[: len(label_map.name) - len(ending)] + ".json")


def preview_path(primary: Path, primary_format: str) -> Path:
    ending = file_ending(primary, primary_format) or ""
    stem = primary.name[: len(primary.name) - len(ending)] if ending else primary.name
    return primary.with_name(stem + "_preview.png")


def check_options(options: OutputOptions, inputs_are_dicom: Sequence[bool]) -> None:
    """Refuse, before any work, DICOM formats for cases that are not DICOM series."""
    if options.needs_dicom and not all(inputs_are_dicom):
        wanted = ", ".join(f for f in options.formats if f in DICOM_FORMATS)
        raise UsageError(f"--output-format {wanted} references the source DICOM series (study, series, frame of "
                         "reference, each slice), so it needs DICOM series inputs; for other inputs use nifti or "
                         "seg-nrrd")
