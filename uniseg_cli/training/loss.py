"""The training loss (docs/pipeline.md §5): soft Dice + cross-entropy on the task's classes, deep supervision;
for region tasks soft Dice + binary cross-entropy on one sigmoid output per region (nnU-Net v2's
DC_and_BCE_loss)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from uniseg_cli.tasks import Task

DICE_SMOOTH = 1e-5


def deep_supervision_weights(outputs: int) -> list[float]:
    """1, 1/2, 1/4, … for the outputs from the finest, 0 for the coarsest, normalised to sum 1."""
    weights = [0.5 ** i for i in range(outputs)]
    weights[-1] = 0.0 if outputs > 1 else 1.0
    total = sum(weights)
    return [w / total for w in weights]


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """Cross-entropy plus negative batch soft Dice over the foreground classes (see ``_dice_ce``)."""
    return _dice_ce(logits, target, classes)[0]


def _dice_ce(logits: torch.Tensor, target: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy plus negative batch soft Dice over the foreground classes (nnU-Net's DC_and_CE).

    Only the first ``classes`` logits take part: the softmax and the CE are over the task's classes.
    ``target`` is (B, Z, Y, X) class indices. Dice sums over batch and voxels (batch Dice), smooth 1e-5.
    """
    logits = logits[:, :classes].float()
    ce = F.cross_entropy(logits, target)
    probabilities = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(target, classes).movedim(-1, 1)[:, 1:].to(probabilities.dtype)
    dice = batch_soft_dice(probabilities, onehot)
    return ce - dice.mean(), dice.detach()


def batch_soft_dice(probabilities: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Soft Dice per channel of (B, C, …) probabilities against masks, summed over batch and voxels.

    ``2 tp + fp + fn`` is ``sum(p) + sum(m)``: one product and two sums instead of three products and
    their complements (the same value up to float rounding; the loss runs on every step's full patch).
    """
    axes = (0, *range(2, probabilities.ndim))
    tp = (probabilities * masks).sum(axes)
    return (2 * tp + DICE_SMOOTH) / (probabilities.sum(axes) + masks.sum(axes) + DICE_SMOOTH)


def region_masks(target: torch.Tensor, regions: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, Z, Y, X) classes → (B, regions, Z, Y, X) float masks: a voxel is in a region if its class is.

    One look-up in a (class, region) table instead of ``torch.isin`` per region, the largest part of
    the loss's time on the CPU. The table is built from the regions alone, with an empty last row for any
    class above them, so that no value is read back from the device (a synchronisation per step on
    CUDA). The masks come out with the regions innermost, the layout of the channels-last logits.
    """
    rows = max(v for r in regions for v in r) + 2
    table = torch.zeros(rows, len(regions))
    for index, region in enumerate(regions):
        table[list(region), index] = 1.0
    return table.to(target.device)[target.clamp(max=rows - 1)].movedim(-1, 1)


def region_dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, regions: Sequence[Sequence[int]]) -> torch.Tensor:
    """Binary cross-entropy plus negative batch soft Dice over the regions (see ``_region_dice_bce``)."""
    return _region_dice_bce(logits, target, regions)[0]


def _region_dice_bce(logits: torch.Tensor, target: torch.Tensor,
                     regions: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary cross-entropy plus negative batch soft Dice over the regions, each its own sigmoid output
    (the first ``len(regions)`` logits), as nnU-Net v2 trains region datasets."""
    logits = logits[:, :len(regions)].float()
    masks = region_masks(target, regions)
    bce = F.binary_cross_entropy_with_logits(logits, masks)
    dice = batch_soft_dice(torch.sigmoid(logits), masks)
    return bce - dice.mean(), dice.detach()


def task_loss(logits: torch.Tensor, target: torch.Tensor, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of one output of ``task`` (regions or softmax classes) and its soft Dice per class."""
    manager = task.label_manager
    if manager.has_regions:
        return _region_dice_bce(logits, target, [s.values for s in manager.regions])
    return _dice_ce(logits, target, manager.num_outputs)


def deep_supervision_loss(outputs: Sequence[torch.Tensor], target: torch.Tensor,
                          task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum over the network's outputs (finest first) against the target downsampled by
    nearest neighbour to each output's size; and the finest output's soft Dice per class (or region),
    which the training log records so that a class the network does not learn shows as such."""
    weights = deep_supervision_weights(len(outputs))
    total = outputs[0].new_zeros((), dtype=torch.float32)
    finest = None
    for weight, output in zip(weights, outputs):
        if weight == 0:
            continue
        scaled = target if output.shape[2:] == target.shape[1:] else \
            F.interpolate(target[:, None].float(), size=output.shape[2:], mode="nearest")[:, 0].long()
        loss, dice = task_loss(output, scaled, task)
        total = total + weight * loss
        finest = dice if finest is None else finest
    return total, finest
