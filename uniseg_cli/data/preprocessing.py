"""Pre-processing (docs/pipeline.md §3), the one code path for training and inference, and its inverse.

Arrays are ``(channels, z, y, x)``; spacings ``(z, y, x)`` in mm. The resampling reproduces
nnU-Net v1's ``resample_data_or_seg``: scikit-image's ``resize(order, mode="edge",
anti_aliasing=False)`` (which is ``scipy.ndimage.zoom(grid_mode=True, mode="nearest")`` followed by
clipping to the input's range), with the low-resolution axis of anisotropic data handled separately
by nearest-neighbour interpolation. It is computed in torch, as one matrix product per axis, so that
it runs on the device that runs the network.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from uniseg_cli.tasks import Channel

if TYPE_CHECKING:
    import torch

ANISOTROPY_THRESHOLD = 3.0
ZSCORE_EPS = 1e-8

Spacing = tuple[float, float, float]
Shape = tuple[int, int, int]


# ------------------------------------------------------------------------------------ orientation
def axial_permutation(axis_world: Sequence[int]) -> tuple[int, int, int]:
    """Array-axis permutation that puts S-I first, then A-P, then L-R (no flips).

    ``axis_world[a]`` is the world axis (0 L-R, 1 A-P, 2 S-I) that array axis ``a`` runs along. An
    axially stored scan gives the identity; an oblique scan whose axes do not map one-to-one is left
    as it is.
    """
    if sorted(axis_world) != [0, 1, 2]:
        return (0, 1, 2)
    return tuple(list(axis_world).index(w) for w in (2, 1, 0))  # type: ignore[return-value]


def inverse_permutation(perm: Sequence[int]) -> tuple[int, int, int]:
    return tuple(int(i) for i in np.argsort(perm))  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------- crop
def nonzero_bbox(data: np.ndarray) -> tuple[slice, slice, slice]:
    """Bounding box of the voxels where any channel is non-zero (the whole image if none is).

    nnU-Net fills holes in the mask first; holes never change a bounding box, so they are not filled.
    """
    mask = np.any(data != 0, axis=0)
    box = []
    for axis in range(3):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, mask.shape[axis]))
    return tuple(box)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------- resampling
def resampled_shape(shape: Sequence[int], spacing: Spacing, target: Spacing) -> Shape:
    return tuple(int(round(s * sp / t)) for s, sp, t in zip(shape, spacing, target))  # type: ignore[return-value]


def _lowres_axis(spacing: Spacing) -> int | None:
    """The single axis with the largest spacing, if the spacing is anisotropic (largest/smallest > 3)."""
    spacing_array = np.asarray(spacing, dtype=float)
    if spacing_array.max() / spacing_array.min() <= ANISOTROPY_THRESHOLD:
        return None
    axes = np.flatnonzero(spacing_array == spacing_array.max())
    return int(axes[0]) if len(axes) == 1 else None


def separate_axis(original: Spacing, target: Spacing) -> int | None:
    """Which axis to resample separately (order 0): the original spacing decides, else the target's.

    nnU-Net v1 falls back to the target spacing only when the original is not anisotropic, and
    resamples jointly when two axes share the largest spacing.
    """
    spacing_array = np.asarray(original, dtype=float)
    if spacing_array.max() / spacing_array.min() > ANISOTROPY_THRESHOLD:
        return _lowres_axis(original)
    return _lowres_axis(target)


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output position for order-0 resampling along one axis.

    nnU-Net maps output ``i`` to ``(i + 0.5) * in / out - 0.5`` and rounds as ``map_coordinates``
    with order 0 and mode "nearest" does.
    """
    coords = (np.arange(size_out, dtype=float) + 0.5) * (size_in / size_out) - 0.5
    return np.clip(np.floor(coords + 0.5), 0, size_in - 1).astype(np.int64)


@functools.lru_cache(maxsize=64)
def zoom_matrix(size_in: int, size_out: int, order: int) -> np.ndarray:
    """scipy's 1-D ``zoom(order, mode="nearest", grid_mode=True)`` as a ``(size_out, size_in)`` matrix.

    Spline resampling is linear along an axis and separable across axes, so resampling a volume is one
    matrix product per axis: far faster than ``scipy.ndimage.zoom`` (docs/benchmarks.md), and it runs
    on whatever device holds the scan. The matrix is scipy's own response to each unit
    vector, so it holds the spline pre-filter and the edge handling exactly; only the products are
    float32 (the tests bound the difference from scipy's float64 result).
    """
    from scipy import ndimage

    return ndimage.zoom(np.eye(size_in), (size_out / size_in, 1), order=order, mode="nearest", grid_mode=True)


def _zoom(volume: torch.Tensor, shape: Sequence[int], order: int, axes: Sequence[int]) -> torch.Tensor:
    """Resample ``axes`` of a 3-D tensor to ``shape``, the most shrinking axis first (least work)."""
    import torch

    for axis in sorted(axes, key=lambda a: shape[a] / volume.shape[a]):
        if volume.shape[axis] == shape[axis]:
            continue
        matrix = torch.from_numpy(zoom_matrix(volume.shape[axis], shape[axis], order)).to(volume.device, torch.float32)
        volume = torch.movedim(torch.tensordot(volume, matrix, dims=([axis], [1])), -1, axis)
    return volume


def resample_image(data: np.ndarray, shape: Sequence[int], *, order: int, axis: int | None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Every channel of ``(c, z, y, x)`` ``data`` resampled to ``shape``, as a new float32 tensor on ``device``.

    As scikit-image's ``resize(order, mode="edge", anti_aliasing=False)`` (scipy's zoom, then clipped to
    the input's range) of each channel; with a separate ``axis``, as nnU-Net v1: each plane across it is
    resized (and clipped to its own range), then the axis is resampled by nearest neighbour.
    """
    import torch

    shape = tuple(int(s) for s in shape)
    out = torch.empty((data.shape[0], *shape), dtype=torch.float32, device=device)
    joint = [a for a in range(3) if a != axis]
    for c in range(data.shape[0]):
        channel = torch.from_numpy(np.asarray(data[c], dtype=np.float32)).to(device)
        if tuple(channel.shape) == shape:
            out[c] = channel
            continue
        if axis is None:
            low, high = channel.min(), channel.max()
        else:  # each plane across the separate axis is clipped to its own range, as nnU-Net resizes planes
            low, high = channel.amin(dim=tuple(joint), keepdim=True), channel.amax(dim=tuple(joint), keepdim=True)
        planes = shape if axis is None else tuple(channel.shape[a] if a == axis else shape[a] for a in range(3))
        resampled = _zoom(channel, planes, order, joint)
        if resampled.shape != channel.shape and order > 0:
            resampled = torch.maximum(torch.minimum(resampled, high), low)
        if axis is not None and resampled.shape[axis] != shape[axis]:
            index = torch.from_numpy(nearest_indices(resampled.shape[axis], shape[axis])).to(device)
            resampled = resampled.index_select(axis, index)
        out[c] = resampled
        del channel, resampled
    return out


# ---------------------------------------------------------------------------------- normalisation
def normalize(data: torch.Tensor, channels: Sequence[Channel]) -> torch.Tensor:
    """Per-channel normalisation in place: CT window to [0, 1], everything else z-scored (float64 statistics)."""
    for c, channel in enumerate(channels):
        x = data[c]
        if channel.normalization == "ct":
            low, high = channel.window  # type: ignore[misc]
            x.clamp_(low, high)
            x -= low
            x /= high - low
        else:
            precise = x.double()
            mean = float(precise.mean())
            std = float(precise.std(correction=0))
            del precise
            x -= mean
            x /= std + ZSCORE_EPS
    return data


# ------------------------------------------------------------------------------------ the pipeline
@dataclass(frozen=True)
class CropInfo:
    """What pre-processing did to one case's grid, so that the prediction can be put back exactly."""

    permutation: tuple[int, int, int]
    shape: Shape                  # after permutation, before cropping
    bbox: tuple[slice, slice, slice]
    spacing: Spacing              # after permutation
    target_spacing: Spacing

    @property
    def cropped_shape(self) -> Shape:
        return tuple(s.stop - s.start for s in self.bbox)  # type: ignore[return-value]

    @property
    def separate_axis(self) -> int | None:
        return separate_axis(self.spacing, self.target_spacing)


def preprocess(data: np.ndarray, spacing: Spacing, axis_world: Sequence[int], channels: Sequence[Channel],
               target_spacing: Spacing, *, device: torch.device | str = "cpu") -> tuple[torch.Tensor, CropInfo]:
    """Reorient, crop, resample and normalise one case; returns the network input (a new float32 tensor
    on ``device``: on a GPU, everything after the crop runs there) and how to undo it."""
    perm = axial_permutation(axis_world)
    data = np.transpose(data, (0, *(p + 1 for p in perm)))
    spacing = tuple(spacing[p] for p in perm)  # type: ignore[assignment]
    bbox = nonzero_bbox(data)
    info = CropInfo(perm, tuple(data.shape[1:]), bbox, spacing, tuple(target_spacing))  # type: ignore[arg-type]
    cropped = data[(slice(None), *bbox)]
    shape = resampled_shape(cropped.shape[1:], spacing, target_spacing)
    resampled = resample_image(cropped, shape, order=3, axis=info.separate_axis, device=device)
    return normalize(resampled, channels), info


def preprocess_labels(labels: np.ndarray, info: CropInfo) -> np.ndarray:
    """A label map ``(z, y, x)`` of class indices through the same reorientation, crop and resampling
    as its image (``info`` from ``preprocess``), to uint8 at the target spacing.

    As nnU-Net v1's ``resize_segmentation``: each class mask is resampled with order 1 (the separate
    axis with order 0) and the voxels at or above 0.5 take that class, later classes winning.
    """
    labels = np.transpose(labels, info.permutation)[info.bbox]
    shape = resampled_shape(labels.shape, info.spacing, info.target_spacing)
    if tuple(labels.shape) == shape:
        return labels.astype(np.uint8)
    out = np.zeros(shape, dtype=np.uint8)
    for value in np.unique(labels):
        if value == 0:
            continue
        mask = (labels == value).astype(np.float32)[None]
        out[resample_image(mask, shape, order=1, axis=info.separate_axis)[0].numpy() >= 0.5] = value
    return out


def resample_probabilities(probabilities: torch.Tensor, info: CropInfo) -> torch.Tensor:
    """Class probabilities ``(k, z, y, x)`` at the target spacing back to the cropped original grid.

    Linear interpolation (torch's with ``align_corners=False`` is scikit-image's order-1 resize with
    edge mode), the separate axis by nearest neighbour, on whatever device the tensor is on.
    """
    import torch
    import torch.nn.functional as F

    shape = info.cropped_shape
    if tuple(probabilities.shape[1:]) == shape:
        return probabilities
    axis = info.separate_axis
    if axis is None:
        return F.interpolate(probabilities[None], size=shape, mode="trilinear", align_corners=False)[0]
    # Slices along the separate axis become the batch of a 2-D resize.
    moved = probabilities.movedim(1 + axis, 0)
    plane = [s for a, s in enumerate(shape) if a != axis]
    planes = F.interpolate(moved, size=plane, mode="bilinear", align_corners=False)
    index = torch.from_numpy(nearest_indices(planes.shape[0], shape[axis])).to(planes.device)
    return planes.index_select(0, index).movedim(0, 1 + axis)


#: Largest slab of full-resolution probabilities held at once by ``labels_from_probabilities``.
EXPORT_SLAB_BYTES = 256 * 2**20


def labels_from_probabilities(probabilities: torch.Tensor, info: CropInfo, *, keep: bool = False,
                              slab_bytes: int = EXPORT_SLAB_BYTES,
                              region_order: Sequence[int] = ()) -> tuple[torch.Tensor, np.ndarray | None]:
    """Labels (uint8, cropped original grid) from probabilities at the target spacing, slab by slab.

    Resampling all classes to the original grid at once needs ``classes × voxels × 4`` bytes (1.9 GB
    for three classes of a 512×512×600 CT); here only slabs of at most ``slab_bytes`` along the first
    axis exist at a time. The interpolation is the same as ``resample_probabilities``: linear along
    the first axis (nearest when it is the separately handled axis), bilinear in-plane. ``keep`` also
    returns the float16 probabilities on the original grid (for ``--save-probabilities``). With
    ``region_order`` the probabilities are a region task's sigmoids: see ``labels_from_regions``.
    """
    import torch
    import torch.nn.functional as F

    def decide(p: torch.Tensor) -> torch.Tensor:
        return labels_from_regions(p, region_order) if region_order else argmax_classes(p)

    shape = info.cropped_shape
    axis = info.separate_axis
    if axis not in (None, 0) or tuple(probabilities.shape[1:]) == shape:
        full = resample_probabilities(probabilities, info)
        return decide(full), (full.half().cpu().numpy() if keep else None)
    classes, size_in = probabilities.shape[0], probabilities.shape[1]
    labels = torch.empty(shape, dtype=torch.uint8, device=probabilities.device)
    kept = np.empty((classes, *shape), dtype=np.float16) if keep else None
    rows = max(1, slab_bytes // (classes * shape[1] * shape[2] * 4))
    if axis == 0:
        lower = torch.from_numpy(nearest_indices(size_in, shape[0])).to(probabilities.device)
        upper, weight = lower, None
    else:  # torch's linear source index with align_corners=False: clamped at 0, upper neighbour capped
        source = ((torch.arange(shape[0], dtype=torch.float64) + 0.5) * (size_in / shape[0]) - 0.5).clamp(min=0)
        lower = source.floor().long()
        upper = torch.clamp(lower + 1, max=size_in - 1)
        weight = (source - lower).float().to(probabilities.device)
        lower, upper = lower.to(probabilities.device), upper.to(probabilities.device)
    for start in range(0, shape[0], rows):
        stop = min(start + rows, shape[0])
        slab = probabilities.index_select(1, lower[start:stop])
        if weight is not None:
            w = weight[start:stop].view(1, -1, 1, 1)
            slab = slab * (1 - w) + probabilities.index_select(1, upper[start:stop]) * w
        if slab.shape[2:] != shape[1:]:
            slab = F.interpolate(slab, size=shape[1:], mode="bilinear", align_corners=False)
        labels[start:stop] = decide(slab)
        if kept is not None:
            kept[:, start:stop] = slab.half().cpu().numpy()
    return labels, kept


def labels_from_regions(probabilities: torch.Tensor, region_order: Sequence[int]) -> torch.Tensor:
    """Region probabilities → classes as nnU-Net v2 does: class ``region_order[i]`` where region ``i``'s
    probability exceeds 0.5, later regions over earlier ones (the inner region of a nested set wins)."""
    import torch

    labels = torch.zeros(probabilities.shape[1:], dtype=torch.uint8, device=probabilities.device)
    for region, value in enumerate(region_order):
        labels[probabilities[region] > 0.5] = value
    return labels


def argmax_classes(probabilities: torch.Tensor) -> torch.Tensor:
    """``probabilities.argmax(0)`` as uint8 (first maximum wins), without torch's slow CPU reduction
    over a short leading axis: a running maximum over the few classes."""
    import torch

    labels = torch.zeros(probabilities.shape[1:], dtype=torch.uint8, device=probabilities.device)
    best = probabilities[0].clone()
    for c in range(1, probabilities.shape[0]):
        better = probabilities[c] > best
        labels[better] = c
        torch.maximum(best, probabilities[c], out=best)
    return labels


def uncrop(labels: np.ndarray, info: CropInfo, *, fill: int = 0, fill_first: float | None = None) -> np.ndarray:
    """Paste a cropped ``(…, z, y, x)`` array into the full grid and undo the axis permutation.

    Outside the crop the array holds ``fill``; ``fill_first`` gives the first channel its own value
    (probabilities: the background is certain where nothing was cropped in)."""
    full = np.full((*labels.shape[:-3], *info.shape), fill, dtype=labels.dtype)
    if fill_first is not None:
        full[0] = fill_first
    full[(..., *info.bbox)] = labels
    lead = tuple(range(labels.ndim - 3))
    inverse = inverse_permutation(info.permutation)
    return np.ascontiguousarray(np.transpose(full, (*lead, *(len(lead) + i for i in inverse))))
