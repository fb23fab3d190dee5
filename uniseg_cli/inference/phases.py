"""The typed hand-offs between the predictor's phases, as in nnU-Net v2's predictor: a case is read and
pre-processed (``PreparedCase``, holding ``NetworkInputs`` and its ``CasePlan``), the network turns it
into a ``Prediction`` on the input's grid, and the exporter (``uniseg_cli.outputs.export``) writes what
the plan lists and returns the ``CaseResult`` that ``--json`` prints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from uniseg_cli.inference.cases import Case
from uniseg_cli.labels import LabelManager, Structure, structure_index
from uniseg_cli.tasks import LabelTerms, Task, label_terms

if TYPE_CHECKING:
    import torch

    from uniseg_cli.data.preprocessing import CropInfo
    from uniseg_cli.io.images import Geometry
    from uniseg_cli.outputs.plan import CasePlan
    from uniseg_cli.quality.plausibility import Finding


@dataclass(frozen=True)
class Label:
    """One value of a written label map and what it means."""

    value: int
    name: str
    task: str

    @property
    def terms(self) -> LabelTerms:
        """Codes and display colour (the task registry's terminology), the structure's own: the same in
        a merged map and in its task's split map."""
        return label_terms(self.name, structure_index(self.task, self.name))


@dataclass
class Prediction:
    """A label map in the input's array order ``(z, y, x)`` plus, if asked, per-task probabilities and
    per-task label maps (each in the task's own numbering 1…n, for ``--split``)."""

    labels: np.ndarray
    legend: list[Label]
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)
    tasks: dict[str, np.ndarray] = field(default_factory=dict)
    regions: list[Structure] = field(default_factory=list)  # region tasks' regions, in ``labels``' numbering
    offsets: dict[str, int] = field(default_factory=dict)   # each task's first value in ``labels`` less one
    managers: dict[str, LabelManager] = field(default_factory=dict)
    flip_entropy: dict[str, np.ndarray] = field(default_factory=dict)  # per task, with --uncertainty and TTA


@dataclass
class CaseResult:
    """What happened to one case; ``to_json`` is the ``--json`` line."""

    case: str
    inputs: list[str]
    task: str
    output: str | None = None
    labels: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    device: str = ""
    probabilities: str | None = None
    outputs: dict[str, str] | None = None
    regions: list[dict[str, Any]] | None = None   # a region task's regions (unions of its classes)
    flags: list[dict[str, Any]] | None = None     # the case's quality flags (uniseg_cli.quality.flags)
    postprocessing: dict[str, Any] | None = None  # what --keep-largest / --min-component-ml removed
    failed_on: list[str] | None = None            # the --fail-on codes the case was flagged with
    skipped: bool = False
    error: str | None = None

    @classmethod
    def of(cls, case: Case, task: str, **outcome: Any) -> CaseResult:
        """The record of ``case``: its name and inputs as given, plus what happened to it."""
        return cls(case=case.name, inputs=[str(p) for p in case.channels], task=task, **outcome)

    def to_json(self) -> dict[str, Any]:
        """Only what happened: a failed or skipped case has no labels, time or device."""
        data = asdict(self)
        if self.error is not None or self.skipped:  # a skipped case keeps the flags its record holds
            data.update(labels=None, regions=None, seconds=None, device=None, postprocessing=None,
                        flags=None if self.error is not None else self.flags)
        return {k: v for k, v in data.items() if v is not None and not (k == "skipped" and not v)}


@dataclass
class NetworkInputs:
    """Pre-processed network inputs of one case: per group of tasks sharing a spacing, the array and
    how to undo the pre-processing; plus the task key of the outputs, the output grid and label numbering."""

    key: str
    shape: tuple[int, int, int]
    legend: list[Label]
    offsets: dict[str, int]
    groups: list[tuple[list[Task], torch.Tensor, CropInfo]]
    regions: list[Structure] = field(default_factory=list)
    accepted: list[Finding] = field(default_factory=list)  # implausible-input findings accepted knowingly


@dataclass
class PreparedCase:
    """A case read and pre-processed, waiting for the network."""

    case: Case
    key: str
    plan: CasePlan
    geometry: Geometry
    inputs: NetworkInputs
    started: float
    intensity: np.ndarray | None = None  # channel 0 as read, for statistics and previews
