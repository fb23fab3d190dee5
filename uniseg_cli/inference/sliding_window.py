"""Sliding-window inference with Gaussian weighting and mirroring TTA (docs/pipeline.md §4).

Window positions and the Gaussian map are small pure helpers; ``sliding_window`` runs the network
over a pre-processed case once per tile and mirror, sharing the encoder between all asked tasks,
and accumulates only each task's classes on the compute device.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from uniseg_cli.inference.runtime import channels_last, precision_context, resolve_precision
from uniseg_cli.labels import Head
from uniseg_cli.model.blocks import inference_kernels
from uniseg_cli.model.network import UniSeg
from uniseg_cli.quality.confidence import flip_entropy as entropy_of_flip
from uniseg_cli.tasks import Task


def tile_starts(image_size: Sequence[int], patch_size: Sequence[int], step: float) -> list[list[int]]:
    """Start of every tile per axis: evenly spread, first at 0, last ending at the border (nnU-Net).

    ``image_size`` must be at least ``patch_size`` (pad first). ``step`` is a fraction of the patch.
    """
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    starts = []
    for size, patch in zip(image_size, patch_size):
        if size < patch:
            raise ValueError(f"image size {size} is smaller than the patch {patch}; pad first")
        count = int(math.ceil((size - patch) / (patch * step))) + 1
        spacing = (size - patch) / (count - 1) if count > 1 else 0.0
        starts.append([int(round(spacing * i)) for i in range(count)])
    return starts


@functools.lru_cache(maxsize=8)
def _gaussian_numpy(patch_size: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros(patch_size)
    impulse[tuple(p // 2 for p in patch_size)] = 1
    gaussian = gaussian_filter(impulse, [p * sigma_scale for p in patch_size], 0, mode="constant", cval=0)
    gaussian = (gaussian / gaussian.max()).astype(np.float32)
    gaussian[gaussian == 0] = gaussian[gaussian != 0].min()
    return gaussian


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 1 / 8) -> np.ndarray:
    """nnU-Net's tile weight: an impulse at the centre blurred with sigma = patch/8, max 1, no zeros."""
    return _gaussian_numpy(tuple(int(p) for p in patch_size), float(sigma_scale)).copy()


@functools.lru_cache(maxsize=4)
def _gaussian_on(patch_size: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The map already on the accumulation device: copied there once per process, not once per case (a copy
    from pageable memory makes the host wait for the GPU). Read-only for its callers."""
    return torch.from_numpy(gaussian_importance(patch_size)).to(device)


def pad_to_patch(data: torch.Tensor, patch_size: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the spatial axes of ``(c, z, y, x)`` up to the patch size, split evenly like nnU-Net."""
    pads, crop = [], []
    for size, patch in zip(data.shape[1:], patch_size):
        extra = max(patch - size, 0)
        before = extra // 2
        pads.append((before, extra - before))
        crop.append(slice(before, before + size))
    if any(p != (0, 0) for p in pads):
        flat = [v for pair in reversed(pads) for v in pair]
        data = torch.nn.functional.pad(data, flat, mode="constant", value=0.0)
    return data, tuple(crop)


@dataclass(frozen=True)
class WindowOptions:
    """How to slide: ``step`` as a fraction of the patch (0.5 = half-overlapping tiles, the published
    default), ``mirror`` for 8-way mirroring TTA (on by default, as published), ``batch_size`` tiles
    per forward pass (more uses more memory, same result), ``precision`` of the network (``auto``:
    fp16 autocast on CUDA, bf16 channels-last on CPUs with bf16 matrix units, fp32 elsewhere; see
    ``runtime.choose_precision``; probabilities are always accumulated in float32). One default for
    the command, the Python API and training's validation."""

    step: float = 0.5
    mirror: bool = True
    batch_size: int = 1
    precision: str = "auto"


def heads(tasks: Sequence[Task]) -> list[Head]:
    """What the window reads per task, from each task's label manager."""
    return [t.label_manager.head for t in tasks]


def sliding_window(model: UniSeg, data: torch.Tensor, tasks: Sequence[Head],
                   options: WindowOptions = WindowOptions(),
                   on_progress: Callable[[int, int], None] | None = None,
                   accumulate_on: torch.device | None = None, flip_entropy: bool = False) -> list[torch.Tensor]:
    """Class probabilities of each ``Head`` (prompt index, output channels, sigmoid) for a pre-processed
    ``(c, z, y, x)`` tensor (``heads(tasks)`` gives them).

    Returns one ``(classes, z, y, x)`` float32 tensor per task on ``accumulate_on`` (default: ``data``'s
    device, where the network runs): the softmax over all network outputs, averaged over mirrors,
    Gaussian-weighted over tiles, restricted to the task's first ``classes`` channels; for a region
    task (``sigmoid``) each of its first ``classes`` outputs through a sigmoid instead.
    ``on_progress(done, total)`` counts network passes over one tile (tiles × mirrors), so that a bar
    moves every few seconds even when one tile's 8 mirrored passes take a minute on a CPU.
    With ``flip_entropy`` each tensor has one more channel, last: the normalised entropy of each mirrored
    copy's probabilities, averaged like them (``uniseg_cli.quality.confidence``: what the TTA
    disagreement map subtracts), at no extra network pass.
    """
    patch = model.config.patch_size
    padded, crop = pad_to_patch(data, patch)
    device = padded.device
    precision = resolve_precision(options.precision, device)
    model.set_channels_last(channels_last(precision, device))
    results = accumulate_on or device
    gaussian = _gaussian_on(tuple(patch), torch.device(results))
    extra = int(flip_entropy)
    sums = [torch.zeros((head.outputs + extra, *padded.shape[1:]), dtype=torch.float32, device=results)
            for head in tasks]
    weights = torch.zeros(padded.shape[1:], dtype=torch.float32, device=results)
    corners = list(itertools.product(*tile_starts(padded.shape[1:], patch, options.step)))
    mirrors = mirror_combinations(model.config.mirror_axes) if options.mirror else [()]
    passes, done = len(corners) * len(mirrors), 0

    def mirror_done(tiles: int) -> None:
        nonlocal done
        done += tiles
        if on_progress is not None:
            on_progress(done, passes)

    for first in range(0, len(corners), options.batch_size):
        batch_corners = corners[first:first + options.batch_size]
        windows = [tuple(slice(c, c + p) for c, p in zip(corner, patch)) for corner in batch_corners]
        x = torch.stack([padded[(slice(None), *w)] for w in windows])
        with precision_context(precision, device), inference_kernels(device):
            predictions = [p.to(results) for p in _predict_tile_batch(model, x, tasks, mirrors, mirror_done,
                                                                       flip_entropy=flip_entropy)]
        for i, window in enumerate(windows):
            weights[window] += gaussian
            for total, prediction in zip(sums, predictions):
                total[(slice(None), *window)].addcmul_(prediction[i], gaussian)  # no temporary per tile
    weights = weights[crop]
    return [total[(slice(None), *crop)] / weights for total in sums]


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every combination of flips of the (z, y, x) ``axes``, none first, as dimensions of a (batch,
    channels, z, y, x) tensor: the published 8 for all three axes, 4 for two, 1 (no flip) for none."""
    dims = [2 + a for a in axes]
    return [()] + [m for r in range(1, len(dims) + 1) for m in itertools.combinations(dims, r)]


def _predict_tile_batch(model: UniSeg, x: torch.Tensor, tasks: Sequence[Head],
                        mirrors: Sequence[tuple[int, ...]], mirror_done: Callable[[int], None], *,
                        flip_entropy: bool = False) -> list[torch.Tensor]:
    """Mirror-averaged softmax (sigmoid for region tasks) of each task for a batch of tiles;
    ``mirror_done(tiles)`` after each mirror; with ``flip_entropy`` the mirror-averaged entropy of each
    copy as one more channel.

    The encoder and the prompt fusion run once per mirror; only the decoder runs per task.
    """
    extra = int(flip_entropy)
    results = [torch.zeros((x.shape[0], head.outputs + extra, *x.shape[2:]), dtype=torch.float32, device=x.device)
               for head in tasks]
    for axes in mirrors:
        features = model.encode(torch.flip(x, axes) if axes else x)
        maps = model.task_maps(features[-1])
        for result, head in zip(results, tasks):
            logits = model.decode(features, head.task_id, maps).to(torch.float32, memory_format=torch.contiguous_format)
            probabilities = (torch.sigmoid(logits[:, :head.outputs]) if head.sigmoid
                             else torch.softmax(logits, dim=1)[:, :head.outputs])
            probabilities = torch.flip(probabilities, axes) if axes else probabilities
            if flip_entropy:
                result[:, :head.outputs] += probabilities
                result[:, head.outputs:] += entropy_of_flip(probabilities, sigmoid=head.sigmoid)
            else:
                result += probabilities
        mirror_done(x.shape[0])
    if len(mirrors) > 1:
        for result in results:
            result /= len(mirrors)
    return results
