"""The training loss (docs/pipeline.md §5): soft Dice + cross-entropy on the task's classes, deep supervision."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

DICE_SMOOTH = 1e-5


def deep_supervision_weights(outputs: int) -> list[float]:
    """1, 1/2, 1/4, … for the outputs from the finest, 0 for the coarsest, normalised to sum 1."""
    weights = [0.5 ** i for i in range(outputs)]
    weights[-1] = 0.0 if outputs > 1 else 1.0
    total = sum(weights)
    return [w / total for w in weights]


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """Cross-entropy plus negative batch soft Dice over the foreground classes (nnU-Net's DC_and_CE).

    Only the first ``classes`` logits take part: the softmax and the CE are over the task's classes.
    ``target`` is (B, Z, Y, X) class indices. Dice sums over batch and voxels (batch Dice), smooth 1e-5.
    """
    logits = logits[:, :classes].float()
    ce = F.cross_entropy(logits, target)
    probabilities = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(target, classes).movedim(-1, 1)[:, 1:].to(probabilities.dtype)
    axes = (0, *range(2, logits.ndim))
    tp = (probabilities * onehot).sum(axes)
    fp = (probabilities * (1 - onehot)).sum(axes)
    fn = ((1 - probabilities) * onehot).sum(axes)
    dice = (2 * tp + DICE_SMOOTH) / (2 * tp + fp + fn + DICE_SMOOTH)
    return ce - dice.mean()


def deep_supervision_loss(outputs: Sequence[torch.Tensor], target: torch.Tensor, classes: int) -> torch.Tensor:
    """Weighted sum over the network's outputs (finest first) against the target downsampled by
    nearest neighbour to each output's size."""
    weights = deep_supervision_weights(len(outputs))
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for weight, output in zip(weights, outputs):
        if weight == 0:
            continue
        scaled = target if output.shape[2:] == target.shape[1:] else \
            F.interpolate(target[:, None].float(), size=output.shape[2:], mode="nearest")[:, 0].long()
        total = total + weight * dice_ce_loss(output, scaled, classes)
    return total
