"""How sure the network was: voxel maps and per-label figures from the probabilities it already
computed (no extra network pass).

Definitions (docs/quality.md):

- **probabilities** p: the network's class probabilities averaged over the mirrored copies of TTA
  and Gaussian-weighted over overlapping tiles, resampled to the scan's grid, exactly those the label
  map is the argmax of (for a region task, each region's sigmoid, thresholded at 0.5);
- **uncertainty** (``<case>_uncertainty.nii.gz``): the normalised entropy of p, in [0, 1]. Softmax
  task with C outputs: ``-sum_c p_c ln p_c / ln C`` (p renormalised over the task's outputs); region
  task: the mean over its regions of the binary entropy ``-(p ln p + (1-p) ln(1-p)) / ln 2``. 0 means
  certain, 1 means every class equally likely. Several tasks: the largest of their values per voxel;
- **disagreement** (``<case>_disagreement.nii.gz``, with TTA only): the part of that entropy that
  comes from the mirrored copies disagreeing, the mutual information ``H(mean p) - mean H(p_flip)``
  (each flip's entropy averaged with the same tile weights, same normalisation; >= 0). It is 0 where
  every flip said the same, however unsure, and large where flips contradict each other;
- **per label** (``confidence`` in the case record): ``mean_probability``, the mean of the label's own
  probability over its voxels; ``share_below``, the share of its voxels with a probability below
  ``CONFIDENT``; ``volume_ml_range``, from the voxels of the label at least ``CONFIDENT`` sure (lower)
  to the label plus every voxel at least ``POSSIBLE`` likely to be it (upper): it always brackets the
  label's volume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

CONFIDENT = 0.75
POSSIBLE = 0.25
_SLAB_VOXELS = 1 << 23  # the float32 temporaries of one slab: 32 MB per class
_TINY = 1e-12


def normalised_entropy(probabilities: np.ndarray, *, sigmoid: bool) -> np.ndarray:
    """Per-voxel normalised entropy of ``(channels, z, y, x)`` probabilities (see the module), float32."""
    out = np.empty(probabilities.shape[1:], dtype=np.float32)
    rows = max(1, _SLAB_VOXELS // max(1, int(np.prod(probabilities.shape[2:]))))
    for start in range(0, probabilities.shape[1], rows):
        slab = probabilities[:, start:start + rows].astype(np.float32)
        out[start:start + rows] = _entropy(slab, sigmoid=sigmoid)
    return out


def _entropy(p: np.ndarray, *, sigmoid: bool) -> np.ndarray:
    if sigmoid:
        q = np.clip(p, _TINY, 1 - 1e-7)
        h = -(q * np.log(q) + (1 - q) * np.log1p(-q)) / math.log(2)
        return np.clip(h.mean(axis=0), 0.0, 1.0)
    channels = p.shape[0]
    if channels < 2:
        return np.zeros(p.shape[1:], dtype=np.float32)
    q = p / np.maximum(p.sum(axis=0, keepdims=True), _TINY)
    h = -(q * np.log(np.maximum(q, _TINY))).sum(axis=0) / math.log(channels)
    return np.clip(h, 0.0, 1.0)


def flip_entropy(probabilities: Any, *, sigmoid: bool) -> Any:
    """The normalised entropy of one flip's probabilities ``(batch, channels, z, y, x)`` as a torch
    tensor ``(batch, 1, z, y, x)``: what the sliding window averages for ``disagreement``."""
    import torch

    if sigmoid:
        q = probabilities.clamp(_TINY, 1 - 1e-7)
        h = -(q * q.log() + (1 - q) * torch.log1p(-q)) / math.log(2)
        return h.mean(dim=1, keepdim=True)
    channels = probabilities.shape[1]
    if channels < 2:
        return torch.zeros_like(probabilities[:, :1])
    q = probabilities / probabilities.sum(dim=1, keepdim=True).clamp_min(_TINY)
    return -(q * q.clamp_min(_TINY).log()).sum(dim=1, keepdim=True) / math.log(channels)


def combine(maps: Sequence[np.ndarray]) -> np.ndarray:
    """Several tasks' maps as one: the largest value per voxel."""
    out = maps[0].copy()
    for other in maps[1:]:
        np.maximum(out, other, out=out)
    return out


def label_confidence(inside: np.ndarray, probability: np.ndarray, voxel_ml: float) -> dict[str, Any]:
    """The ``confidence`` record of a label whose voxels are ``inside`` (bool), its own probability map
    ``probability`` on the same grid."""
    voxels = int(inside.sum())
    likely = probability >= POSSIBLE
    outside_likely = int(np.count_nonzero(likely & ~inside))
    if voxels == 0:
        return {"mean_probability": None, "share_below": None, "threshold": CONFIDENT,
                "volume_ml_range": [0.0, round(outside_likely * voxel_ml, 3)], "range_thresholds": [CONFIDENT, POSSIBLE]}
    own = probability[inside].astype(np.float32)
    sure = int(np.count_nonzero(own >= CONFIDENT))
    return {"mean_probability": round(float(own.mean()), 4),
            "share_below": round(1.0 - sure / voxels, 4), "threshold": CONFIDENT,
            "volume_ml_range": [round(sure * voxel_ml, 3), round((voxels + outside_likely) * voxel_ml, 3)],
            "range_thresholds": [CONFIDENT, POSSIBLE]}
