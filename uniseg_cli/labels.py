"""One label manager per task (nnU-Net v2's ``LabelManager``): what the network emits for the task and
what every value and region of the written map is.

A softmax task emits ``len(labels) + 1`` channels (background first) and its map holds classes 1…n. A
region task (nnU-Net v2's ``regions_class_order``: nested structures such as BraTS whole tumour ⊃
tumour core ⊃ enhancing tumour) emits exactly one sigmoid channel per region; its map writes class
``region_order[i]`` where region ``i`` is predicted, later regions over earlier ones, so a class of the
map is *not* a region: with BraTS regions class 1 is the whole tumour without the core (edema), and the
whole tumour is classes 1 + 2 + 3. The manager names each class for what it is and keeps the regions
as their own structures, so that volumes, DICOM segments, Slicer segments and RTSTRUCT ROIs say what
they hold. Codes and colours belong to a structure (task and name), never to a number in one map.

Everything that decides "region or softmax" asks this object: the sliding window (``head``), the
conversion of probabilities to a map (``region_order``), the loss and the metrics (``scored``), and
every writer (``classes``, ``regions``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from uniseg_cli.tasks import LabelTerms, Task, label_terms

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Head:
    """What the sliding window reads for one task: its prompt index, the output channels it uses and
    whether they go through a sigmoid (regions) or the softmax over all outputs (classes)."""

    task_id: int
    outputs: int
    sigmoid: bool = False


@dataclass(frozen=True)
class Structure:
    """A class of a task's map (``values`` one class) or a region (``values`` the classes it unites),
    in the task's own numbering 1…n."""

    task: str
    name: str
    values: tuple[int, ...]
    region: bool = False

    @property
    def terms(self) -> LabelTerms:
        """Codes and display colour, the same for this structure in every map it appears in."""
        return label_terms(self.name, structure_index(self.task, self.name))


def structure_index(task: str, name: str) -> int:
    """A stable number for a structure the terminology table does not know, which picks its palette
    colour: from its task and name, not from its value in one map (merged and split maps agree)."""
    return zlib.crc32(f"{task}/{name}".encode()) + 1


class LabelManager:
    """The label manager of one task; ``Task.label_manager`` gives it."""

    def __init__(self, task: Task) -> None:
        self.task = task

    @property
    def has_regions(self) -> bool:
        return bool(self.task.regions)

    @property
    def num_outputs(self) -> int:
        """Network output channels the task reads: one per region, or its classes with background."""
        return len(self.task.regions) if self.has_regions else len(self.task.labels) + 1

    @property
    def head(self) -> Head:
        return Head(self.task.id, self.num_outputs, self.has_regions)

    @property
    def region_order(self) -> tuple[int, ...]:
        """The class each region writes (empty for a softmax task): what turns sigmoids into a map."""
        return self.task.region_order

    @cached_property
    def regions(self) -> tuple[Structure, ...]:
        """The task's regions, named as its dataset named them (empty for a softmax task)."""
        return tuple(Structure(self.task.key, name, tuple(classes), region=True)
                     for name, classes in zip(self.region_names, self.task.regions))

    @property
    def region_names(self) -> tuple[str, ...]:
        # the configuration lists, for class c, the name of the region that writes it (nnU-Net's
        # dataset.json names regions, not classes)
        return tuple(self.task.labels[c - 1] for c in self.task.region_order)

    @cached_property
    def classes(self) -> tuple[Structure, ...]:
        """Classes 1…n of the written map, each named for what it holds. A region task's class is its
        innermost region less the regions nested inside that one ("whole tumour without tumour core")."""
        if not self.has_regions:
            return tuple(Structure(self.task.key, name, (i,)) for i, name in enumerate(self.task.labels, start=1))
        return tuple(Structure(self.task.key, self._class_name(c), (c,)) for c in range(1, len(self.task.labels) + 1))

    def _class_name(self, value: int) -> str:
        holding = [r for r in self.regions if value in r.values]
        innermost = min(holding, key=lambda r: len(r.values))
        if innermost.values == (value,):
            return innermost.name
        inside = [r for r in self.regions if set(r.values) < set(innermost.values) and value not in r.values]
        outermost_inside = [r for r in inside if not any(set(r.values) < set(o.values) for o in inside)]
        return f"{innermost.name} without {' and '.join(r.name for r in outermost_inside)}"

    @property
    def scored(self) -> tuple[Structure, ...]:
        """What the loss and the metrics score: the regions of a region task (as nnU-Net and BraTS
        score them), else the classes."""
        return self.regions if self.has_regions else self.classes

    def channel(self, structure: Structure) -> int:
        """The output channel holding ``structure``'s probability (its values in the task's numbering): a
        softmax class's own channel, a region's, or for a region task's class the region that writes it."""
        if structure.region:
            return [r.name for r in self.regions].index(structure.name)
        value = structure.values[0]
        return self.region_order.index(value) if self.has_regions else value

    def masks(self, labels: np.ndarray, offset: int = 0) -> list[np.ndarray]:
        """Boolean masks of ``scored`` in a map of this task's classes (shifted by ``offset`` in a merged map)."""
        import numpy as np

        return [np.isin(labels, [v + offset for v in s.values]) for s in self.scored]


def label_manager(task: Task) -> LabelManager:
    return LabelManager(task)
