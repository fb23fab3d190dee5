"""The model configuration: everything needed to rebuild a network and use it, saved as ``config.json``.

Like timm's ``PretrainedCfg``, a frozen dataclass travels with the weights: architecture
arguments, the tasks with their labels, spacing and normalisation, and where the weights came
from. Importable without torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from uniseg_cli.errors import ConfigError
from uniseg_cli.io.jsonfile import read_json
from uniseg_cli.tasks import UPSTREAM_TASKS, Task, _check_keys, _typed, validate_tasks

CONFIG_FORMAT = "uniseg"
CONFIG_VERSION = 1
ALL_AXES = (0, 1, 2)  # z, y, x

Triple = tuple[int, int, int]

PUBLISHED_POOL_KERNELS: tuple[Triple, ...] = ((1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
PUBLISHED_CONV_KERNELS: tuple[Triple, ...] = ((1, 3, 3),) + ((3, 3, 3),) * 5


@dataclass(frozen=True)
class UniSegConfig:
    """Architecture and tasks of one UniSeg model; the defaults are the published model.

    patch_size: (z, y, x) voxels of one network input. The universal prompt has a spatial size tied
        to it, so the network accepts exactly this size and inference tiles with it.
    base_features / max_features: channels of stage 0, doubled per stage up to the maximum.
    pool_kernels: stride of each down-sampling stage (stages 1…n), also the kernels of the
        transposed convolutions that undo them.
    conv_kernels: kernel size of the convolutions of each stage (stages 0…n).
    convs_per_stage: conv blocks per encoder stage (the decoder uses the same number).
    num_classes: output channels of the network, background included; each task uses the first
        ``len(task.labels) + 1`` of them.
    input_channels: channel counts the first convolution accepts, one ``conv_<n>`` each.
    tasks: the prompted tasks, in prompt order.
    prompted: False for a downstream model fine-tuned without the universal prompt and fusion layer
        (the paper's transfer protocol): one task, a plain U-Net.
    fusion_width: hidden width of the fusion layer when it is not the published
        ``(bottleneck features + tasks) // 4`` (a model grown by a new task keeps its pretrained width).
    mirror_axes: the (z, y, x) array axes (0, 1, 2) the model was trained to be mirror-invariant along,
        and so the axes mirroring TTA flips (nnU-Net's ``inference_allowed_mirroring_axes``). Published:
        all three. A model whose labels are lateral (left/right structures) is trained without the
        left-right axis, one trained without augmentation without any.
    license / source: where the weights come from and under which terms; shown by ``uniseg`` and
        carried into model cards.
    """

    patch_size: Triple = (64, 192, 192)
    base_features: int = 32
    max_features: int = 320
    pool_kernels: tuple[Triple, ...] = PUBLISHED_POOL_KERNELS
    conv_kernels: tuple[Triple, ...] = PUBLISHED_CONV_KERNELS
    convs_per_stage: int = 2
    num_classes: int = 4
    input_channels: tuple[int, ...] = (1, 2, 4)
    tasks: tuple[Task, ...] = field(default=UPSTREAM_TASKS)
    prompted: bool = True
    fusion_width: int | None = None
    mirror_axes: tuple[int, ...] = ALL_AXES
    license: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------------- derived
    @property
    def num_stages(self) -> int:
        """Encoder stages, the bottleneck included."""
        return len(self.conv_kernels)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def stage_features(self) -> tuple[int, ...]:
        return tuple(min(self.base_features * 2**d, self.max_features) for d in range(self.num_stages))

    @property
    def total_stride(self) -> Triple:
        """Down-sampling from the input to the bottleneck, per axis."""
        return tuple(math.prod(k[axis] for k in self.pool_kernels) for axis in range(3))  # type: ignore[return-value]

    @property
    def prompt_shape(self) -> Triple:
        """Spatial size of the universal prompt = the bottleneck size for one patch."""
        return tuple(p // s for p, s in zip(self.patch_size, self.total_stride))  # type: ignore[return-value]

    @property
    def fusion_features(self) -> int:
        """Hidden width of the prompt fusion layer: (bottleneck features + tasks) // 4 unless set."""
        if self.fusion_width is not None:
            return self.fusion_width
        return (self.stage_features[-1] + self.num_tasks) // 4

    # ------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        if len(self.pool_kernels) + 1 != len(self.conv_kernels):
            raise ConfigError(
                f"conv_kernels: expected {len(self.pool_kernels) + 1} (one per stage), got {len(self.conv_kernels)}"
            )
        for name, value in (("patch_size", self.patch_size), *[("pool_kernels", k) for k in self.pool_kernels],
                            *[("conv_kernels", k) for k in self.conv_kernels]):
            if len(value) != 3 or not all(isinstance(v, int) and v >= 1 for v in value):
                raise ConfigError(f"{name}: expected three positive integers, got {value}")
        for kernel in self.conv_kernels:
            if any(k not in (1, 3) for k in kernel):
                raise ConfigError(f"conv_kernels: sizes must be 1 or 3 (padding keeps the shape), got {kernel}")
        if any(p % s for p, s in zip(self.patch_size, self.total_stride)):
            raise ConfigError(
                f"patch_size {self.patch_size} must be divisible by the total stride {self.total_stride}"
            )
        if math.prod(self.prompt_shape) < 2:
            raise ConfigError(
                f"patch_size {self.patch_size} leaves a bottleneck of {self.prompt_shape} voxels; instance "
                "normalisation needs more than one (use at least twice the total stride on one axis)"
            )
        for name, value in (("base_features", self.base_features), ("max_features", self.max_features),
                            ("convs_per_stage", self.convs_per_stage)):
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if self.convs_per_stage < 2:
            raise ConfigError("convs_per_stage must be at least 2 (the bottleneck is stored as two stacks)")
        if not self.input_channels or len(set(self.input_channels)) != len(self.input_channels) \
                or any(c < 1 for c in self.input_channels):
            raise ConfigError(f"input_channels must be distinct positive counts, got {self.input_channels}")
        if not self.tasks:
            raise ConfigError("a model needs at least one task")
        if not self.prompted and len(self.tasks) != 1:
            raise ConfigError("a model without the prompt (prompted: false) has exactly one task")
        if self.fusion_width is not None and self.fusion_width < 1:
            raise ConfigError(f"fusion_width must be at least 1, got {self.fusion_width}")
        if tuple(sorted(set(self.mirror_axes))) != tuple(self.mirror_axes) or not set(self.mirror_axes) <= set(ALL_AXES):
            raise ConfigError(f"mirror_axes must be distinct axes among 0, 1, 2 (z, y, x) in order, got {list(self.mirror_axes)}")
        validate_tasks(self.tasks)
        for task in self.tasks:
            if task.label_manager.num_outputs > self.num_classes:
                raise ConfigError(f"task {task.key!r} reads {task.label_manager.num_outputs} output channels but the "
                                  f"network emits {self.num_classes}")
            if len(task.channels) not in self.input_channels:
                raise ConfigError(
                    f"task {task.key!r} takes {len(task.channels)} channels; the network accepts {self.input_channels}"
                )

    # ----------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CONFIG_FORMAT,
            "format_version": CONFIG_VERSION,
            "architecture": {
                "patch_size": list(self.patch_size),
                "base_features": self.base_features,
                "max_features": self.max_features,
                "pool_kernels": [list(k) for k in self.pool_kernels],
                "conv_kernels": [list(k) for k in self.conv_kernels],
                "convs_per_stage": self.convs_per_stage,
                "num_classes": self.num_classes,
                "input_channels": list(self.input_channels),
                **({} if self.prompted else {"prompted": False}),
                **({} if self.fusion_width is None else {"fusion_width": self.fusion_width}),
            },
            "tasks": [t.to_dict() for t in self.tasks],
            **({} if self.mirror_axes == ALL_AXES else {"mirror_axes": list(self.mirror_axes)}),
            "license": self.license,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UniSegConfig:
        """Parse ``config.json``; unknown keys, missing keys and wrong types are ConfigErrors."""
        _check_keys(data, required={"format", "format_version", "architecture", "tasks"},
                    optional={"license", "source", "mirror_axes"}, where="config")
        if data["format"] != CONFIG_FORMAT:
            raise ConfigError(f"config: format must be {CONFIG_FORMAT!r}, got {data['format']!r}")
        if data["format_version"] != CONFIG_VERSION:
            raise ConfigError(
                f"config: format_version {data['format_version']!r} is not supported (this uniseg reads {CONFIG_VERSION})"
            )
        arch = data["architecture"]
        keys = {"patch_size", "base_features", "max_features", "pool_kernels", "conv_kernels",
                "convs_per_stage", "num_classes", "input_channels"}
        _check_keys(arch, required=keys, optional={"prompted", "fusion_width"}, where="config architecture")
        where = "config architecture"
        return cls(
            patch_size=_int_tuple(arch["patch_size"], where, "patch_size"),
            base_features=_typed(arch["base_features"], int, where, "base_features"),
            max_features=_typed(arch["max_features"], int, where, "max_features"),
            pool_kernels=tuple(_int_tuple(k, where, "pool_kernels") for k in _typed(arch["pool_kernels"], list, where, "pool_kernels")),
            conv_kernels=tuple(_int_tuple(k, where, "conv_kernels") for k in _typed(arch["conv_kernels"], list, where, "conv_kernels")),
            convs_per_stage=_typed(arch["convs_per_stage"], int, where, "convs_per_stage"),
            num_classes=_typed(arch["num_classes"], int, where, "num_classes"),
            input_channels=tuple(_typed(c, int, where, "input_channels") for c in _typed(arch["input_channels"], list, where, "input_channels")),
            tasks=tuple(Task.from_dict(t) for t in _typed(data["tasks"], list, "config", "tasks")),
            prompted=_typed(arch.get("prompted", True), bool, where, "prompted"),
            fusion_width=None if arch.get("fusion_width") is None else _typed(arch["fusion_width"], int, where, "fusion_width"),
            mirror_axes=tuple(_typed(a, int, "config", "mirror_axes")
                              for a in _typed(data.get("mirror_axes", list(ALL_AXES)), list, "config", "mirror_axes")),
            license=_typed(data.get("license", ""), str, "config", "license"),
            source=_typed(data.get("source", ""), str, "config", "source"),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json_file(cls, path: str | Path) -> UniSegConfig:
        path = Path(path)
        data = read_json(path, ConfigError)
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def with_changes(self, **changes: Any) -> UniSegConfig:
        return replace(self, **changes)


def _int_tuple(value: Any, where: str, what: str) -> Triple:
    if (not isinstance(value, list) or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ConfigError(f"{where}: {what} entries must be lists of 3 integers, got {value!r}")
    return tuple(value)  # type: ignore[return-value]


def small_config(**changes: Any) -> UniSegConfig:
    """A CPU-sized configuration for tests and smoke runs: patch 32×64×64, 4 base features.

    The smallest patch that leaves the bottleneck more than one voxel (2×2×2) with the published
    strides.
    """
    return UniSegConfig(patch_size=(32, 64, 64), base_features=4, max_features=32, **changes)
