"""nnU-Net v1 "moreDA" augmentation with torch on the training device (docs/pipeline.md §5).

The loader workers only crop (``sampling``); everything here runs where the network trains. Order
and parameters follow nnU-Net v1's ``get_moreDA_augmentation`` for 3D data: spatial (rotation ±30°
per axis, scaling 0.7–1.4, each with per-sample probability 0.2; elastic off), Gaussian noise,
Gaussian blur, multiplicative brightness, contrast, low-resolution simulation, inverted gamma, gamma,
mirroring. Images are interpolated trilinearly and labels by nearest neighbour.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from uniseg_cli.config import ALL_AXES


def spatial_transform(image: torch.Tensor, labels: torch.Tensor, matrix: torch.Tensor | None,
                      patch_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample the patch from a crop: ``matrix`` maps output offsets (voxels, from the patch centre) to
    offsets from the crop centre. ``image`` (C, …) float, ``labels`` (…) integer; None = the crop is the patch."""
    if matrix is None:
        return image, labels
    device = image.device
    axes = [torch.arange(p, device=device, dtype=torch.float32) - (p - 1) / 2 for p in patch_size]
    offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)           # (z, y, x, 3) as (dz, dy, dx)
    size = torch.tensor(image.shape[1:], device=device, dtype=torch.float32)
    source = offsets @ matrix.to(device).T + (size - 1) / 2                       # crop voxel coordinates
    grid = (2 * source / (size - 1).clamp(min=1) - 1).flip(-1)[None]              # grid_sample wants (x, y, z)
    warped = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    warped_labels = F.grid_sample(labels[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                                  align_corners=True)[0, 0]
    return warped, warped_labels.to(labels.dtype)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of one (z, y, x) channel, truncated at 4 sigma, edges replicated."""
    radius = max(1, int(math.ceil(4 * sigma)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel /= kernel.sum()
    out = x[None, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out[0, 0]


def _gamma(x: torch.Tensor, gamma: float, invert: bool) -> torch.Tensor:
    """batchgenerators' gamma with retain_stats: range to [0, 1], power, range back, mean/std restored."""
    if invert:
        x = -x
    mean, std = x.mean(), x.std()
    low, span = x.min(), x.max() - x.min()
    x = ((x - low) / (span + 1e-7)).pow(gamma) * (span + 1e-7) + low
    x = (x - x.mean()) / (x.std() + 1e-8) * std + mean
    return -x if invert else x


def intensity_and_mirror(image: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator,
                         generator: torch.Generator,
                         mirror_axes: Sequence[int] = ALL_AXES) -> tuple[torch.Tensor, torch.Tensor]:
    """The intensity transforms and mirroring of one sample (C, z, y, x), drawn from ``rng``; flips only
    along ``mirror_axes`` (the model's, which TTA then uses)."""
    image = image.clone()
    if rng.random() < 0.1:  # Gaussian noise, variance U(0, 0.1)
        noise = torch.randn(image.shape, generator=generator, device=image.device)
        image += noise * math.sqrt(rng.uniform(0, 0.1))
    if rng.random() < 0.2:  # Gaussian blur, sigma U(0.5, 1), each channel with p 0.5
        for c in range(image.shape[0]):
            if rng.random() < 0.5:
                image[c] = _blur(image[c], rng.uniform(0.5, 1.0))
    if rng.random() < 0.15:  # multiplicative brightness U(0.75, 1.25)
        image *= rng.uniform(0.75, 1.25)
    if rng.random() < 0.15:  # contrast U(0.75, 1.25), range preserved
        for c in range(image.shape[0]):
            x = image[c]
            low, high, mean = x.min(), x.max(), x.mean()
            image[c] = ((x - mean) * rng.uniform(0.75, 1.25) + mean).clamp(low, high)
    if rng.random() < 0.25:  # low resolution: nearest down by U(0.5, 1), trilinear back; each channel p 0.5
        shape = image.shape[1:]
        for c in range(image.shape[0]):
            if rng.random() < 0.5:
                zoom = rng.uniform(0.5, 1.0)
                small = [max(1, int(round(s * zoom))) for s in shape]
                down = F.interpolate(image[c][None, None], size=small, mode="nearest")
                image[c] = F.interpolate(down, size=shape, mode="trilinear", align_corners=False)[0, 0]
    if rng.random() < 0.1:  # inverted gamma U(0.7, 1.5)
        for c in range(image.shape[0]):
            image[c] = _gamma(image[c], _gamma_value(rng), invert=True)
    if rng.random() < 0.3:  # gamma U(0.7, 1.5)
        for c in range(image.shape[0]):
            image[c] = _gamma(image[c], _gamma_value(rng), invert=False)
    # one draw per axis whichever are allowed, so that a sample's other transforms do not depend on them
    flips = [axis for axis in range(3) if rng.random() < 0.5 and axis in mirror_axes]
    if flips:
        image = torch.flip(image, [1 + a for a in flips])
        labels = torch.flip(labels, flips)
    return image, labels


def _gamma_value(rng: np.random.Generator) -> float:
    # batchgenerators draws below 1 half the time, so that both sides of 1 are equally likely
    return rng.uniform(0.7, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, 1.5)


def augment_batch(batch: dict[str, object], device: torch.device, patch_size: Sequence[int], *,
                  augment: bool = True, mirror_axes: Sequence[int] = ALL_AXES) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch to ``(images (B, C, …) float32, labels (B, …) int64)`` on ``device``, augmented."""
    rng = np.random.default_rng(int(batch["seed"]))  # type: ignore[arg-type]
    generator = torch.Generator(device=device)
    generator.manual_seed(int(batch["seed"]) % 2**63)  # type: ignore[arg-type]
    images, labels = [], []
    for image, seg, matrix in zip(batch["images"], batch["labels"], batch["matrices"]):  # type: ignore[call-overload]
        image = image.to(device, non_blocking=True).float()
        seg = seg.to(device, non_blocking=True).long()
        image, seg = spatial_transform(image, seg, matrix, patch_size)
        if augment:
            image, seg = intensity_and_mirror(image, seg, rng, generator, mirror_axes)
        images.append(image)
        labels.append(seg)
    return torch.stack(images), torch.stack(labels)
