"""The task registry: what each segmentation task takes as input and what it labels.

Plain data, importable without torch, so that ``uniseg tasks`` answers instantly. A model carries
its own task list in ``config.json`` (a fine-tuned model may add tasks); ``UPSTREAM_TASKS`` are the
11 tasks of the published UniSeg model (docs/pipeline.md §2) and the default for new configurations.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from uniseg_cli.errors import ConfigError, UnknownNameError, UsageError

if TYPE_CHECKING:
    from uniseg_cli.labels import LabelManager

#: The published pipeline clips CT to this window (HU) and scales it to [0, 1].
CT_WINDOW: tuple[float, float] = (-325.0, 325.0)

NORMALIZATIONS = ("ct", "zscore")


@dataclass(frozen=True)
class Channel:
    """One input channel: its name (shown to users), modality and how it is normalised.

    ``normalization`` is ``"ct"`` (clip to ``window`` then scale to [0, 1]) or ``"zscore"``
    (subtract the mean, divide by the standard deviation over the cropped image).
    """

    name: str
    modality: str
    normalization: str = "zscore"
    window: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"channel {self.name!r}: normalization must be one of {NORMALIZATIONS}, "
                f"got {self.normalization!r}"
            )
        if (self.normalization == "ct") != (self.window is not None):
            raise ConfigError(f"channel {self.name!r}: a window is given exactly for CT normalization")


@dataclass(frozen=True)
class Task:
    """One segmentation task the model is prompted with.

    ``id`` is the index of the task's prompt channel in the network; ``labels`` are the foreground
    classes in output order (class 0 is always background), so the task uses the first
    ``len(labels) + 1`` of the network's output channels, through a softmax.

    A region task (nnU-Net v2's region-based training, for nested structures such as whole tumour ⊃
    tumour core ⊃ enhancing tumour) has ``regions``: the classes each region holds. It uses one output
    channel per region through a sigmoid; the label map writes class ``region_order[i]`` where region
    ``i`` is predicted, later regions over earlier ones (nnU-Net's ``regions_class_order``).
    """

    id: int
    key: str
    name: str
    channels: tuple[Channel, ...]
    labels: tuple[str, ...]
    target_spacing: tuple[float, float, float]
    aliases: tuple[str, ...] = field(default=())
    regions: tuple[tuple[int, ...], ...] = field(default=())
    region_order: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if bool(self.regions) != bool(self.region_order):
            raise ConfigError(f"task {self.key!r}: regions and region_order come together")
        if self.regions:
            n = len(self.labels)
            if len(self.regions) != n or sorted(self.region_order) != list(range(1, n + 1)):
                raise ConfigError(f"task {self.key!r}: {len(self.regions)} region(s) for {n} label(s); region_order "
                                  f"must write each class 1…{n} once, got {list(self.region_order)}")
            if any(not r or not set(r) <= set(range(1, n + 1)) for r in self.regions):
                raise ConfigError(f"task {self.key!r}: every region must hold classes among 1…{n}")

    @property
    def num_classes(self) -> int:
        """Values of the task's label map, background included (classes 1…n and 0)."""
        return len(self.labels) + 1

    @property
    def label_manager(self) -> LabelManager:
        """Output channels, nonlinearity, classes and regions of this task (``uniseg_cli.labels``)."""
        from uniseg_cli.labels import LabelManager

        return LabelManager(self)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(c.modality for c in self.channels)

    def names(self) -> tuple[str, ...]:
        """Every spelling that selects this task: key, aliases and the id as text."""
        return (self.key, *self.aliases, str(self.id))

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "key": self.key,
            "name": self.name,
            "aliases": list(self.aliases),
            "channels": [
                {
                    "name": c.name,
                    "modality": c.modality,
                    "normalization": c.normalization,
                    **({"window": list(c.window)} if c.window is not None else {}),
                }
                for c in self.channels
            ],
            "labels": list(self.labels),
            "target_spacing": list(self.target_spacing),
            **({"regions": [list(r) for r in self.regions], "region_order": list(self.region_order)}
               if self.regions else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Task:
        """Parse one task of ``config.json``; unknown keys and wrong types are ConfigErrors."""
        where = f"task {data.get('key', data.get('id', '?'))!r}"
        _check_keys(data, required={"id", "key", "name", "channels", "labels", "target_spacing"},
                    optional={"aliases", "regions", "region_order"}, where=where)
        channels = []
        for raw in _typed(data["channels"], list, where, "channels"):
            _check_keys(raw, required={"name", "modality", "normalization"}, optional={"window"},
                        where=f"{where} channel")
            window = raw.get("window")
            channels.append(Channel(
                name=_typed(raw["name"], str, where, "channel name"),
                modality=_typed(raw["modality"], str, where, "channel modality"),
                normalization=_typed(raw["normalization"], str, where, "channel normalization"),
                window=None if window is None else _float_tuple(window, 2, where, "channel window"),
            ))
        return cls(
            id=_typed(data["id"], int, where, "id"),
            key=_typed(data["key"], str, where, "key"),
            name=_typed(data["name"], str, where, "name"),
            aliases=tuple(_typed(a, str, where, "alias") for a in _typed(data.get("aliases", []), list, where, "aliases")),
            channels=tuple(channels),
            labels=tuple(_typed(v, str, where, "label") for v in _typed(data["labels"], list, where, "labels")),
            target_spacing=_float_tuple(data["target_spacing"], 3, where, "target_spacing"),
            regions=tuple(tuple(_typed(c, int, where, "region class") for c in _typed(r, list, where, "region"))
                          for r in _typed(data.get("regions", []), list, where, "regions")),
            region_order=tuple(_typed(c, int, where, "region_order entry")
                               for c in _typed(data.get("region_order", []), list, where, "region_order")),
        )


def _check_keys(data: Any, *, required: set[str], optional: set[str], where: str) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    missing = required - set(data)
    unknown = set(data) - required - optional
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(sorted(missing))}")
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")


def _typed(value: Any, kind: type, where: str, what: str) -> Any:
    # bool is an int subclass; a JSON true where a number belongs is still a mistake.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {what} must be {kind.__name__}, got {value!r}")
    return value


def _float_tuple(value: Any, n: int, where: str, what: str) -> tuple[float, ...]:
    if (not isinstance(value, list) or len(value) != n
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ConfigError(f"{where}: {what} must be a list of {n} numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _ct(name: str = "CT") -> Channel:
    return Channel(name, "CT", "ct", CT_WINDOW)


def _mr(name: str) -> Channel:
    return Channel(name, "MR", "zscore")


_ABDOMEN = (3.0, 1.5, 1.5)

UPSTREAM_TASKS: tuple[Task, ...] = (
    Task(0, "liver", "liver and liver tumour", (_ct(),), ("liver", "liver tumour"), _ABDOMEN,
         aliases=("live", "lits")),
    Task(1, "kidney", "kidney and kidney tumour", (_ct(),), ("kidney", "kidney tumour"), _ABDOMEN,
         aliases=("kidn", "kits")),
    Task(2, "hepatic_vessel", "hepatic vessel and tumour", (_ct(),), ("hepatic vessel", "hepatic tumour"),
         _ABDOMEN, aliases=("hepa", "hepaticvessel", "vessel")),
    Task(3, "pancreas", "pancreas and tumour", (_ct(),), ("pancreas", "pancreas tumour"), _ABDOMEN,
         aliases=("panc",)),
    Task(4, "colon", "colon tumour", (_ct(),), ("colon tumour",), _ABDOMEN, aliases=("colo",)),
    Task(5, "lung", "lung tumour", (_ct(),), ("lung tumour",), _ABDOMEN, aliases=()),
    Task(6, "spleen", "spleen", (_ct(),), ("spleen",), _ABDOMEN, aliases=("sple",)),
    Task(7, "vertebrae", "vertebrae (VerSe20)", (_ct(),), ("vertebrae",), (4.0, 2.0, 2.0),
         aliases=("vert", "verse", "spine")),
    Task(8, "prostate", "prostate", (_mr("T2"),), ("prostate",), _ABDOMEN, aliases=("pros",)),
    Task(9, "brain_tumor", "brain tumour (BraTS21)",
         (_mr("T1"), _mr("T1ce"), _mr("T2"), _mr("FLAIR")),
         ("edema", "non-enhancing tumour", "enhancing tumour"), (1.0, 1.0, 1.0),
         aliases=("brat", "brats", "brain", "brain_tumour")),
    Task(10, "pet_lesion", "whole-body lesions (AutoPET)",
         (_ct(), Channel("PET", "PET", "zscore")), ("lesion",), (8.0, 4.0, 4.0),
         aliases=("pet", "autopet", "lesion")),
)


# ---------------------------------------------------------------------------------- terminology
@dataclass(frozen=True)
class Code:
    """A coded concept (value, coding scheme, meaning) as DICOM and 3D Slicer store them."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class LabelTerms:
    """What a label is, in codes the tools read: DICOM SEG's segmented property category and type (and
    the anatomic region a tumour lies in), 3D Slicer's terminology entry, and a display colour (RGB)."""

    category: Code
    type: Code
    colour: tuple[int, int, int]
    region: Code | None = None


_ANATOMY = Code("91723000", "SCT", "Anatomical Structure")
_ABNORMAL = Code("49755003", "SCT", "Morphologically Abnormal Structure")
_TISSUE = Code("85756007", "SCT", "Tissue")
_NEOPLASM = Code("108369006", "SCT", "Neoplasm")
_LIVER = Code("10200004", "SCT", "Liver")
_KIDNEY = Code("64033007", "SCT", "Kidney")
_PANCREAS = Code("15776009", "SCT", "Pancreas")
_BRAIN = Code("12738006", "SCT", "Brain")

#: The labels of the 11 upstream tasks in SNOMED CT (codes as in DICOM PS3.16 / pydicom's dictionary);
#: colours follow 3D Slicer's anatomy colours where it has one, and differ within every merged map.
LABEL_TERMS: dict[str, LabelTerms] = {
    "liver": LabelTerms(_ANATOMY, _LIVER, (221, 130, 101)),
    "liver tumour": LabelTerms(_ABNORMAL, _NEOPLASM, (255, 255, 0), _LIVER),
    "kidney": LabelTerms(_ANATOMY, _KIDNEY, (46, 204, 113)),  # not Slicer's: it is too close to its liver
    "kidney tumour": LabelTerms(_ABNORMAL, _NEOPLASM, (0, 255, 255), _KIDNEY),
    "hepatic vessel": LabelTerms(_ANATOMY, Code("59820001", "SCT", "Blood Vessel"), (0, 151, 206), _LIVER),
    "hepatic tumour": LabelTerms(_ABNORMAL, _NEOPLASM, (255, 128, 0), _LIVER),
    "pancreas": LabelTerms(_ANATOMY, _PANCREAS, (249, 180, 111)),
    "pancreas tumour": LabelTerms(_ABNORMAL, _NEOPLASM, (255, 0, 255), _PANCREAS),
    "colon tumour": LabelTerms(_ABNORMAL, _NEOPLASM, (128, 0, 255), Code("71854001", "SCT", "Colon")),
    "lung tumour": LabelTerms(_ABNORMAL, _NEOPLASM, (255, 64, 64), Code("39607008", "SCT", "Lung")),
    "spleen": LabelTerms(_ANATOMY, Code("78961009", "SCT", "Spleen"), (157, 108, 162)),
    "vertebrae": LabelTerms(_ANATOMY, Code("51282000", "SCT", "Vertebra"), (241, 214, 145)),
    "prostate": LabelTerms(_ANATOMY, Code("41216001", "SCT", "Prostate"), (230, 158, 140)),
    "edema": LabelTerms(_ABNORMAL, Code("79654002", "SCT", "Edema"), (0, 200, 0), _BRAIN),
    "non-enhancing tumour": LabelTerms(_ABNORMAL, _NEOPLASM, (220, 20, 20), _BRAIN),
    "enhancing tumour": LabelTerms(_ABNORMAL, _NEOPLASM, (255, 220, 0), _BRAIN),
    "lesion": LabelTerms(_ABNORMAL, Code("52988006", "SCT", "Lesion"), (255, 0, 0)),
}

#: Colours of labels the table does not know (a fine-tuned model's own), by label value.
_PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def label_terms(name: str, value: int) -> LabelTerms:
    """The terms of a label by its name; one the table does not know is coded honestly as plain
    tissue (SCT Tissue), never guessed from its name, with a colour from a fixed palette."""
    known = LABEL_TERMS.get(name.strip().lower())
    if known is not None:
        return known
    return LabelTerms(_TISSUE, _TISSUE, _PALETTE[(value - 1) % len(_PALETTE)])


def validate_tasks(tasks: Sequence[Task]) -> None:
    """Ids must be 0…T-1 in order (they index the prompt), and every name must select one task."""
    seen: dict[str, str] = {}
    for index, task in enumerate(tasks):
        if task.id != index:
            raise ConfigError(f"task {task.key!r}: id {task.id} at position {index}; ids must be 0…{len(tasks) - 1} in order")
        if not task.channels:
            raise ConfigError(f"task {task.key!r}: no input channels")
        if not task.labels:
            raise ConfigError(f"task {task.key!r}: no foreground labels")
        if any(s <= 0 for s in task.target_spacing):
            raise ConfigError(f"task {task.key!r}: target_spacing must be positive, got {task.target_spacing}")
        for name in task.names():
            lowered = name.lower()
            if lowered in seen and seen[lowered] != task.key:
                raise ConfigError(f"name {name!r} selects both task {seen[lowered]!r} and task {task.key!r}")
            seen[lowered] = task.key


def resolve_task(spec: str | int, tasks: Iterable[Task] = UPSTREAM_TASKS) -> Task:
    """The task a user means by a key, alias or id (case-insensitive); unknown names suggest one."""
    tasks = tuple(tasks)
    wanted = str(spec).strip().lower()
    for task in tasks:
        if wanted in (n.lower() for n in task.names()):
            return task
    known = next((t for t in UPSTREAM_TASKS if wanted in (n.lower() for n in (t.key, *t.aliases))), None)
    if known is not None:  # a task uniseg knows, but this model was not trained for
        raise UsageError(f"task {str(spec)!r} ({known.name}) is not one of this model's tasks "
                         f"({', '.join(t.key for t in tasks)}); the published model uniseg-11task has it")
    raise UnknownNameError("task", str(spec), [t.key for t in tasks] + [a for t in tasks for a in t.aliases])


validate_tasks(UPSTREAM_TASKS)
