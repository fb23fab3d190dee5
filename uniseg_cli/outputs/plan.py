"""The output plan: every file a case will write, known and checked before any work.

One ``CasePlan`` per case lists its files in the order they are published: each label map in each
``--output-format`` (with ``--split`` one set per task), the label table beside each NIfTI map, the
preview, the probabilities, and the case record last (``uniseg_cli.outputs.record``). The same plan
drives writing (``uniseg_cli.outputs.export``), ``--skip-existing`` (``CasePlan.incomplete``) and the
``--json`` record. ``check_plans`` refuses, in one line, a batch in which any planned file would
replace an input, land in an input DICOM series folder, or be planned twice (two formats, two cases,
a map and the statistics table).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from uniseg_cli.errors import UsageError
from uniseg_cli.inference.cases import Case
from uniseg_cli.outputs.formats import FORMATS, OutputOptions, sibling, stem
from uniseg_cli.outputs.record import incomplete

#: What ``--save-probabilities`` may write: format → file ending.
PROBABILITY_ENDINGS = {"npz": ".npz", "nifti": ".nii.gz"}
#: The voxel maps of ``--uncertainty`` (uniseg_cli.quality.confidence), by role and file-name suffix.
UNCERTAINTY_ROLES = ("uncertainty", "disagreement")


@dataclass(frozen=True)
class PlannedFile:
    """One file of a case: where it goes, what it is (``map``, ``label-table``, ``preview``,
    ``probabilities``, ``record``), a map's format and, with ``--split``, its task."""

    path: Path
    role: str
    fmt: str | None = None
    task: str | None = None

    def describe(self) -> str:
        what = f"{self.fmt} label map" if self.role == "map" else self.role.replace("-", " ")
        return what + (f" of task {self.task}" if self.task else "")


@dataclass(frozen=True)
class MapPlan:
    """The files of one label map: the merged map (``task`` None) or one task's with ``--split``."""

    task: str | None
    files: dict[str, Path]           # format → path, the first format first
    label_table: Path | None         # beside the NIfTI map; None if the case record is that table

    @property
    def primary(self) -> Path:
        return next(iter(self.files.values()))


@dataclass(frozen=True)
class CasePlan:
    """Everything one case writes, in publishing order (the record last)."""

    case: Case
    key: str
    maps: tuple[MapPlan, ...]
    preview: Path | None
    probabilities: Path | None
    record: Path | None
    uncertainty: tuple[Path, ...] = ()  # the uncertainty map, then (with TTA) the disagreement map

    @property
    def primary(self) -> Path:
        """The first format's file of the first map: what ``-o`` names and ``--json`` calls ``output``."""
        return self.maps[0].primary

    @property
    def files(self) -> list[PlannedFile]:
        planned = []
        for m in self.maps:
            planned += [PlannedFile(path, "map", fmt, m.task) for fmt, path in m.files.items()]
            if m.label_table is not None:
                planned.append(PlannedFile(m.label_table, "label-table", None, m.task))
        if self.preview is not None:
            planned.append(PlannedFile(self.preview, "preview"))
        if self.probabilities is not None:
            planned.append(PlannedFile(self.probabilities, "probabilities"))
        planned += [PlannedFile(path, role) for path, role in zip(self.uncertainty, UNCERTAINTY_ROLES)]
        if self.record is not None:
            planned.append(PlannedFile(self.record, "record"))
        return planned

    def incomplete(self) -> str | None:
        """Why this case is not finished on disk (None: every planned file is there as its record says)."""
        if self.record is None:
            return "no record (--no-sidecar)"
        return incomplete(self.record, [f.path for f in self.files if f.role != "record"])


def plan_case(case: Case, key: str, primary: Path, options: OutputOptions, *, split_tasks: Sequence[str] = (),
              probabilities: str | None = None) -> CasePlan:
    """The plan of one case whose first output is ``primary`` (``uniseg_cli.inference.cases.output_path``);
    ``split_tasks`` are the task keys of ``--split`` maps, in the model's order."""
    first = options.formats[0]
    if options.split and split_tasks:
        ending = FORMATS[first].ending
        primaries = [(task, primary.with_name(f"{case.name}_{task}{ending}")) for task in split_tasks]
    else:
        primaries = [(None, primary)]
    record = primaries[0][1].with_name(stem(primaries[0][1], first) + ".json") if options.sidecar else None
    maps = []
    for task, path in primaries:
        files = {fmt: path if fmt == first else sibling(path, first, fmt) for fmt in options.formats}
        table = None
        if options.sidecar and "nifti" in files:
            table = files["nifti"].with_name(stem(files["nifti"], "nifti") + ".json")
            table = None if table == record else table
        maps.append(MapPlan(task, files, table))
    base = primary.with_name(stem(primary, first))
    preview = (options.preview_path or base.with_name(base.name + "_preview.png")) if options.preview else None
    chances = None
    if probabilities is not None:
        chances = base.with_name(base.name + "_probabilities" + PROBABILITY_ENDINGS[probabilities])
    uncertainty = ()
    if options.uncertainty:
        roles = UNCERTAINTY_ROLES if options.disagreement else UNCERTAINTY_ROLES[:1]
        uncertainty = tuple(base.with_name(f"{base.name}_{role}.nii.gz") for role in roles)
    return CasePlan(case, key, tuple(maps), preview, chances, record, uncertainty)


def check_plans(plans: Sequence[CasePlan], others: Sequence[tuple[Path, str]] = ()) -> None:
    """Refuse the batch, before any work, if a planned file (or one of ``others``: (path, what) such as
    the statistics table) is an input of any case, lies inside an input DICOM series folder, is an
    existing folder, or is planned twice."""
    inputs: dict[Path, tuple[Path, Case]] = {}
    series: list[tuple[Path, Path, Case]] = []
    for plan in plans:
        for channel in plan.case.channels:
            resolved = channel.resolve()
            inputs[resolved] = (channel, plan.case)
            if channel.is_dir():
                series.append((resolved, channel, plan.case))
    entries: list[tuple[Path, str, Case | None]] = [
        (f.path, f"the {f.describe()} of case {plan.case.name!r}", plan.case) for plan in plans for f in plan.files]
    entries += [(path, what, None) for path, what in others]
    seen: dict[Path, str] = {}
    for path, what, owner in entries:
        target = path.resolve()
        if target in inputs:
            given, case = inputs[target]
            whose = "" if case == owner else f" of case {case.name!r}"
            raise UsageError(f"{path}: {what} would overwrite the input{whose} {given}; give another -o or format")
        for folder, given, _ in series:
            if folder in target.parents:
                raise UsageError(f"{path}: {what} would be written into the input series folder {given}; "
                                 "give another output folder")
        if path.is_dir():
            raise UsageError(f"{path}: {what} would replace a folder")
        if target in seen:
            raise UsageError(f"{path}: is planned twice, as {seen[target]} and as {what}; give -o a folder or "
                             "formats with different endings")
        seen[target] = what
