"""Turning ``uniseg predict`` arguments into cases (one or more channel files each) and output paths.

The grouping rules, so that it is never ambiguous which files form a case:
- a comma-separated argument, a line of standard input (``-``) and a DICOM series folder are
  exactly one case, channels in the order given;
- a folder of scans and the plain file arguments are grouped by nnU-Net's naming: files
  ``NAME_0000.ext``, ``NAME_0001.ext``, … in one folder are the channels of case ``NAME``; any
  other scan file is a one-channel case. Channel numbers must start at 0 and have no gaps, and a
  ``NAME.ext`` beside ``NAME_0000.ext`` is an error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from uniseg_cli.inference.schedulers import Shard
from uniseg_cli.errors import UsageError
from uniseg_cli.io.images import image_ending, is_dicom_folder, strip_ending

_CHANNEL = re.compile(r"^(?P<name>.+)_(?P<index>\d{4})$")


@dataclass(frozen=True)
class Case:
    """One scan to segment: its name (used for output files) and its channel files in order."""

    name: str
    channels: tuple[Path, ...]


def case_name(path: Path) -> str:
    """The case name of a channel file: its name without ending and without nnU-Net's ``_0000``."""
    stem = strip_ending(path) if not path.is_dir() else path.name
    match = _CHANNEL.match(stem)
    return match.group("name") if match else stem


def collect_cases(arguments: Sequence[str], stdin_lines: Iterable[str] = ()) -> list[Case]:
    """The cases named by the arguments (``-`` reads one case per line from ``stdin_lines``), in order."""
    cases: list[Case] = []
    loose: list[Path] = []
    for argument in arguments:
        if argument == "-":
            cases += [_explicit_case(line.strip()) for line in stdin_lines if line.strip()]
        elif "," in argument:
            cases.append(_explicit_case(argument))
        else:
            path = Path(argument)
            if path.is_dir():
                cases += _folder_cases(path)
            else:
                loose.append(path)
    cases += group_channel_files(loose)
    cases = _without_own_outputs(cases)
    names: dict[str, Case] = {}
    for case in cases:
        if case.name in names and names[case.name] != case:
            raise UsageError(f"two cases are named {case.name!r} ({names[case.name].channels[0]} and "
                             f"{case.channels[0]}); their outputs would collide")
        names[case.name] = case
    return list(dict.fromkeys(cases))


def own_output(path: Path, listed: dict[Path, dict[str, str]]) -> str | None:
    """Why ``path`` is a file uniseg wrote (a record beside it lists it, or its header says so), or None.
    ``listed`` caches each folder's records."""
    from uniseg_cli.io.images import image_description
    from uniseg_cli.outputs.formats import OUTPUT_MARK
    from uniseg_cli.outputs.record import listed_outputs

    if path.is_dir():
        return None
    folder = path.parent
    if folder not in listed:
        listed[folder] = listed_outputs(folder)
    if path.name in listed[folder]:
        return f"listed in {listed[folder][path.name]}"
    if image_description(path).startswith(OUTPUT_MARK):
        return "its header says uniseg wrote it"
    return None


def _without_own_outputs(cases: list[Case]) -> list[Case]:
    """The cases less those whose files uniseg wrote (label maps, probabilities of an earlier run into
    the same folder): segmenting a label map as a scan gives nonsense with exit 0. One line says which."""
    import logging

    listed: dict[Path, dict[str, str]] = {}
    kept, dropped = [], []
    for case in cases:
        why = next((w for w in (own_output(p, listed) for p in case.channels) if w), None)
        (dropped.append(f"{case.channels[0].name} ({why})") if why else kept.append(case))
    if dropped:
        logging.getLogger(__name__).info("skipping %d file(s) uniseg wrote, not scans: %s", len(dropped),
                                         ", ".join(dropped[:5]) + (", …" if len(dropped) > 5 else ""))
    return kept


def _folder_cases(path: Path) -> list[Case]:
    """A folder of scans (grouped by channel naming) plus DICOM series subfolders, or one DICOM series.

    Scan files are listed first: a folder that holds them is not a series, which spares scanning every
    file of a large folder for DICOM headers.
    """
    files = sorted(p for p in path.iterdir() if image_ending(p) and not p.name.startswith("."))
    if not files and is_dicom_folder(path):
        return [Case(path.name, (path,))]
    subfolders = sorted(p for p in path.iterdir() if p.is_dir() and is_dicom_folder(p))
    if not files and not subfolders:
        raise UsageError(f"{path}: folder holds no scans (.nii.gz, .nii, .nrrd, .mha, .mhd) and no DICOM series")
    return group_channel_files(files) + [Case(p.name, (p,)) for p in subfolders]


def _explicit_case(text: str) -> Case:
    paths = tuple(Path(p.strip()) for p in text.split(",") if p.strip())
    if not paths:
        raise UsageError(f"{text!r}: no file names")
    return Case(case_name(paths[0]), paths)


def group_channel_files(files: Sequence[Path]) -> list[Case]:
    """Group files by nnU-Net's ``NAME_0000``, ``NAME_0001``, … naming (per folder); other files are one case each."""
    groups: dict[tuple[Path, str], dict[int, Path]] = {}
    singles: dict[tuple[Path, str], Path] = {}
    order: list[tuple[Path, str]] = []
    for path in files:
        stem = strip_ending(path)
        match = _CHANNEL.match(stem)
        key = (path.parent, match.group("name") if match else stem)
        if key not in order:
            order.append(key)
        if match:
            channel = int(match.group("index"))
            if channel in groups.setdefault(key, {}):
                raise UsageError(f"{path}: channel {channel:04d} of case {key[1]!r} is given twice")
            groups[key][channel] = path
        else:
            singles[key] = path
    cases = []
    for key in order:
        if key in groups and key in singles:
            raise UsageError(f"{singles[key]}: ambiguous beside {groups[key][min(groups[key])]} "
                             f"(is it case {key[1]!r} or one of its channels?)")
        if key in singles:
            cases.append(Case(key[1], (singles[key],)))
            continue
        channels = groups[key]
        if sorted(channels) != list(range(len(channels))):
            present = ", ".join(f"{c:04d}" for c in sorted(channels))
            raise UsageError(f"case {key[1]!r} in {key[0]}: channel files must be numbered 0000, 0001, … "
                             f"without gaps; found {present}")
        cases.append(Case(key[1], tuple(channels[c] for c in sorted(channels))))
    return cases


def select_shard(cases: Sequence[Case], shard: Shard | None) -> list[Case]:
    """Shard ``I/N``: every N-th case starting at I, in a deterministic (sorted by name, then path) order."""
    if shard is None:
        return list(cases)
    ordered = sorted(cases, key=lambda c: (c.name, str(c.channels[0])))
    return ordered[shard.index::shard.count]


def output_path(case: Case, task_key: str, output: Path | None, *, single: bool, fmt: str = "nifti") -> Path:
    """Where a case's first output goes: ``-o`` as a file (one case), ``-o`` as a folder, or the working
    folder; ``fmt`` (the first ``--output-format``) gives the default ending and the endings ``-o`` may have."""
    from uniseg_cli.outputs.formats import FORMATS, accepted_endings, file_ending

    default_name = f"{case.name}_{task_key}{FORMATS[fmt].ending}"
    if output is None:
        return Path.cwd() / default_name
    if file_ending(output, fmt) and not output.is_dir():
        if not single:
            raise UsageError(f"{output}: -o names one file, but there are several cases; give a folder")
        return output
    if not output.is_dir() and re.fullmatch(r"\.[A-Za-z]\w{0,4}", output.suffix):
        # `-o out.png` would otherwise become a folder named out.png
        what = "a label map" if fmt == "nifti" else f"a {fmt} file"
        raise UsageError(f"{output}: not {what} name (end it in {', '.join(accepted_endings(fmt))}) nor a folder "
                         "(to write into a new folder with a dot in its name, create it first)")
    return output / default_name
