"""Sliding-window inference with Gaussian weighting and mirroring TTA (docs/pipeline.md §4).

Window positions and the Gaussian map are small pure helpers; ``sliding_window`` runs the network
over a pre-processed case once per tile and mirror, sharing the encoder between all asked tasks,
and accumulates only each task's classes on the compute device.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from uniseg_cli.inference.runtime import channels_last, choose_precision, precision_context
from uniseg_cli.labels import Head
from uniseg_cli.model.blocks import inference_kernels
from uniseg_cli.model.network import UniSeg
from uniseg_cli.quality.confidence import flip_entropy as entropy_of_flip
from uniseg_cli.tasks import Task

log = logging.getLogger(__name__)


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
    fp16 autocast on CUDA, fp32 elsewhere; see ``runtime.choose_precision``; probabilities are always
    accumulated in float32). One default for the command, the Python API and training's validation."""

    step: float = 0.5
    mirror: bool = True
    batch_size: int = 1
    precision: str = "auto"
    #: recompute in fp32 the tiles holding a voxel decided by less than this margin; None: as ``precision``
    #: chooses (``bf16-checked``: ``runtime.NEAR_TIE_MARGIN``; every other: never)
    near_tie: float | None = None

    def resolved(self, device: torch.device) -> WindowOptions:
        """These options with ``precision`` resolved for ``device`` (``runtime.choose_precision``) and
        ``near_tie`` set: an explicit margin wins over the one the precision brings."""
        choice = choose_precision(self.precision, device)
        return replace(self, precision=choice.precision,
                       near_tie=choice.near_tie if self.near_tie is None else self.near_tie)

    @property
    def precision_label(self) -> str:
        """The precision as logs and run reports state it."""
        return f"{self.precision}, fp32 near ties" if self.near_tie else self.precision


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
    disagreement map subtracts), at no extra network pass. With a near-tie margin (``bf16-checked``) the
    tiles holding a voxel that the reduced-precision pass decided by less than it are run again in fp32,
    and those voxels get exactly the fp32 pass's sums (``near_ties``).
    """
    patch = model.config.patch_size
    padded, crop = pad_to_patch(data, patch)
    device = padded.device
    options = options.resolved(device)
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

    def accumulate(tiles: Sequence[tuple[int, ...]], precision: str, only: torch.Tensor | None = None) -> None:
        """Add the tiles' Gaussian-weighted predictions to ``sums`` and ``weights`` (with ``only``, a boolean
        map of the padded grid, there alone: ×1 and +0 elsewhere, so those voxels get exactly the sums
        of a whole pass at ``precision``)."""
        model.set_channels_last(channels_last(precision, device))
        for first in range(0, len(tiles), options.batch_size):
            windows = [tuple(slice(c, c + p) for c, p in zip(corner, patch))
                       for corner in tiles[first:first + options.batch_size]]
            x = torch.stack([padded[(slice(None), *w)] for w in windows])
            with precision_context(precision, device), inference_kernels(device):
                predictions = [p.to(results) for p in _predict_tile_batch(model, x, tasks, mirrors, mirror_done,
                                                                           flip_entropy=flip_entropy)]
            for i, window in enumerate(windows):
                mask = None if only is None else only[window].to(torch.float32)
                weights[window] += gaussian if mask is None else gaussian * mask
                for total, prediction in zip(sums, predictions):
                    tile = prediction[i] if mask is None else prediction[i] * mask
                    total[(slice(None), *window)].addcmul_(tile, gaussian)  # no temporary per tile

    accumulate(corners, options.precision)
    margin = options.near_tie
    if margin and options.precision != "fp32":
        near = near_ties(sums, weights, tasks, crop, margin)
        again = [c for c in corners if near[tuple(slice(a, a + p) for a, p in zip(c, patch))].any()]
        log.debug("%d of %d tiles hold a near tie (margin < %g, %.4f%% of the voxels): again in fp32",
                  len(again), len(corners), margin, 100 * near.float().mean().item())
        if again:
            passes += len(again) * len(mirrors)
            weights[near] = 0
            for total in sums:
                total[:, near] = 0
            accumulate(again, "fp32", near)
    weights = weights[crop]
    return [total[(slice(None), *crop)] / weights for total in sums]


#: z-slices of the accumulators looked at together when finding near ties (bounds the temporaries)
_SLAB = 16


def near_ties(sums: Sequence[torch.Tensor], weights: torch.Tensor, tasks: Sequence[Head], crop: tuple[slice, ...],
              margin: float) -> torch.Tensor:
    """Where a reduced-precision pass may have decided differently from fp32: the voxels inside ``crop``
    whose two likeliest classes (softmax heads) or a region's probability and 0.5 (sigmoid heads) lie
    within ``margin`` in some task, and their neighbours (the export interpolates between them), as a
    boolean map of the padded grid. Slab by slab along z, so that no full-size temporary exists."""
    near = torch.zeros(weights.shape, dtype=torch.bool, device=weights.device)
    z = crop[0]
    for start in range(z.start, z.stop, _SLAB):
        # one slice more on each side for the dilation, within the crop
        low, high = max(start - 1, z.start), min(start + _SLAB + 1, z.stop)
        w = weights[(slice(low, high), *crop[1:])]
        tie = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
        for total, head in zip(sums, tasks):
            p = total[(slice(0, head.outputs), slice(low, high), *crop[1:])] / w
            if head.sigmoid:
                tie |= ((p - 0.5).abs() < margin).any(0)
            elif head.outputs > 1:
                tie |= _top_two_gap(p) < margin
        grown = torch.nn.functional.max_pool3d(tie[None, None].to(torch.float32), 3, 1, 1)[0, 0] > 0
        near[(slice(start, min(start + _SLAB, z.stop)), *crop[1:])] = grown[start - low:start - low + _SLAB]
    return near


def _top_two_gap(p: torch.Tensor) -> torch.Tensor:
    """Largest minus second-largest along the first (class) axis: a running pair over the few classes,
    where ``topk`` over a short leading axis is slow on the CPU."""
    first, second = p[0].clone(), torch.full_like(p[0], -math.inf)
    for c in range(1, p.shape[0]):
        torch.maximum(second, torch.minimum(first, p[c]), out=second)
        torch.maximum(first, p[c], out=first)
    return first - second


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
