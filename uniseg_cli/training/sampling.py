"""What each training batch holds: task-balanced epochs, foreground oversampling, and the crop that
spatial augmentation needs (docs/pipeline.md §5).

Every batch is built from ``(epoch, index)`` alone with its own seeded generator, so the batches do
not depend on the number of loader workers or ranks, and a resumed run draws the same batches an
uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from uniseg_cli.data.training_cache import TaskData

#: nnU-Net's oversample_foreground_percent: the last third of each batch is centred on foreground.
FOREGROUND_FRACTION = 1 / 3


@dataclass(frozen=True)
class SpatialOptions:
    """nnU-Net v1 "moreDA" spatial parameters: per-sample probabilities and ranges."""

    p_rotation: float = 0.2
    max_rotation_degrees: float = 30.0
    p_scale: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)


def epoch_schedule(num_tasks: int, batches_per_task: int, epoch: int, seed: int) -> list[int]:
    """The task of every batch of one epoch: each task equally often, in a seeded random order."""
    order = np.repeat(np.arange(num_tasks), batches_per_task)
    np.random.default_rng([seed, epoch, 7]).shuffle(order)
    return [int(t) for t in order]


def forced_foreground(batch_size: int) -> list[bool]:
    """Which samples of a batch must be centred on foreground (nnU-Net: the last round(bs/3))."""
    keep_random = round(batch_size * (1 - FOREGROUND_FRACTION))
    return [i >= keep_random for i in range(batch_size)]


def rotation_matrix(angles: Sequence[float]) -> np.ndarray:
    """Rotation about the z, y and x axes (radians), acting on (z, y, x) voxel offsets."""
    a, b, c = angles
    rz = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rx = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def crop_padded(array: np.ndarray, low: Sequence[int], high: Sequence[int]) -> np.ndarray:
    """``array[..., low:high]`` over the last three axes, zero outside the array."""
    spatial = array.shape[-3:]
    out = np.zeros((*array.shape[:-3], *(h - l for l, h in zip(low, high))), dtype=array.dtype)
    src = tuple(slice(max(l, 0), min(h, s)) for l, h, s in zip(low, high, spatial))
    dst = tuple(slice(max(l, 0) - l, min(h, s) - l) for l, h, s in zip(low, high, spatial))
    if all(s.stop > s.start for s in src):
        out[(..., *dst)] = array[(..., *src)]
    return out


class PatchBatches(torch.utils.data.Dataset):
    """Map-style dataset: item ``(epoch, index, task)`` is one batch of that task.

    A sample is a crop around its centre: exactly the patch when no spatial augmentation is drawn,
    else the region the rotated and scaled patch covers plus the matrix (output offset → source
    offset, in voxels); ``augment.spatial_transform`` resamples it on the training device.
    """

    def __init__(self, tasks: Sequence[TaskData], cases: Sequence[Sequence[str]], patch_size: Sequence[int],
                 batch_size: int, seed: int, spatial: SpatialOptions | None = SpatialOptions()) -> None:
        self.tasks, self.cases = list(tasks), [list(c) for c in cases]
        self.patch = np.asarray(patch_size, dtype=np.int64)
        self.batch_size, self.seed, self.spatial = batch_size, seed, spatial
        # per worker process: memory maps and foreground positions, opened/read once per case
        self._cases: dict[tuple[int, str], tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]] = {}

    def __len__(self) -> int:  # items are addressed by (epoch, index, task), not by position
        return 0

    def __getitem__(self, item: tuple[int, int, int]) -> dict[str, object]:
        epoch, index, task = item
        rng = np.random.default_rng([self.seed, epoch, index])
        images, labels, matrices, classes = [], [], [], []
        for forced in forced_foreground(self.batch_size):
            case = self.cases[task][int(rng.integers(len(self.cases[task])))]
            image, seg, locations = self._case(task, case)
            centre, chosen = self._centre(rng, locations, seg.shape, forced)
            classes.append(chosen)
            matrix = self._matrix(rng)
            half = (self.patch - 1) / 2
            reach = np.ceil(np.abs(matrix) @ half).astype(np.int64) + 1 if matrix is not None else None
            if reach is None:
                low = centre - self.patch // 2
                high = low + self.patch
            else:
                low, high = centre - reach, centre + reach + 1
            images.append(torch.from_numpy(crop_padded(image, low, high)))
            labels.append(torch.from_numpy(crop_padded(seg, low, high)))
            matrices.append(None if matrix is None else torch.from_numpy(matrix.astype(np.float32)))
        return {"task": task, "images": images, "labels": labels, "matrices": matrices, "classes": classes,
                "seed": int(rng.integers(2**62))}

    def _case(self, task: int, case: str) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
        key = (task, case)
        if key not in self._cases:
            data = self.tasks[task]
            self._cases[key] = (data.image(case), data.labels(case), data.locations(case))
        return self._cases[key]

    def _centre(self, rng: np.random.Generator, locations: dict[int, np.ndarray], shape: Sequence[int],
                forced: bool) -> tuple[np.ndarray, int | None]:
        """The patch centre and, for a forced sample, the class it was drawn for.

        As nnU-Net's loader, a patch lies inside the image wherever the image is at least a patch wide
        (centred, padded evenly, where it is narrower): a random patch starts anywhere in that range, a
        forced one is placed on a voxel of a class picked uniformly among those present, moved inwards
        just enough to stay inside (nnU-Net clamps only the lower side). Patches reaching half outside
        the image would train on zero padding that the sliding window never shows the network, and a
        network can learn where the padding is instead of what the anatomy is.
        """
        size = np.asarray(shape, dtype=np.int64)
        lowest = np.where(size >= self.patch, 0, -((self.patch - size) // 2))
        highest = np.where(size >= self.patch, size - self.patch, lowest)
        chosen = None
        if forced and locations:
            classes = sorted(locations)
            chosen = classes[int(rng.integers(len(classes)))]
            positions = locations[chosen]
            start = np.clip(positions[int(rng.integers(len(positions)))] - self.patch // 2, lowest, highest)
        else:
            start = np.array([int(rng.integers(low, high + 1)) for low, high in zip(lowest, highest)], dtype=np.int64)
        return start + self.patch // 2, chosen

    def _matrix(self, rng: np.random.Generator) -> np.ndarray | None:
        if self.spatial is None:
            return None
        rotate = rng.random() < self.spatial.p_rotation
        scale = rng.random() < self.spatial.p_scale
        if not (rotate or scale):
            return None
        limit = math.radians(self.spatial.max_rotation_degrees)
        matrix = rotation_matrix(rng.uniform(-limit, limit, 3)) if rotate else np.eye(3)
        if scale:
            matrix = matrix * rng.uniform(*self.spatial.scale_range)
        return matrix


class EpochSampler(torch.utils.data.Sampler):
    """Yields this rank's ``(epoch, index, task)`` items of the current epoch (``set_epoch`` first)."""

    def __init__(self, num_tasks: int, batches_per_task: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.num_tasks, self.batches_per_task, self.seed = num_tasks, batches_per_task, seed
        self.rank, self.world, self.epoch = rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def items(self) -> list[tuple[int, int, int]]:
        schedule = epoch_schedule(self.num_tasks, self.batches_per_task, self.epoch, self.seed)
        # every rank takes the same number of steps (DDP needs it); a remainder is dropped
        steps = len(schedule) // self.world
        return [(self.epoch, i, schedule[i]) for i in range(self.rank, steps * self.world, self.world)]

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return iter(self.items())

    def __len__(self) -> int:
        return self.num_tasks * self.batches_per_task // self.world
