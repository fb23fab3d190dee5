"""What the benchmarks measure, in one place: label-map agreement and the FLOPs of a forward pass.

Imports nothing heavy at module level, so that a benchmark can still choose the allocator before torch loads.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    """Dice of label ``value`` between two maps; 1 when neither has it."""
    x, y = a == value, b == value
    total = int(x.sum()) + int(y.sum())
    return 1.0 if total == 0 else 2 * int((x & y).sum()) / total


def flops_per_forward(config: Any) -> float:
    """FLOPs (2 × multiply-adds) of one forward pass of a patch, counted by torch on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from uniseg_cli.model.network import UniSeg

    with torch.device("meta"):
        model = UniSeg(config).eval()
        x = torch.empty(1, 1, *config.patch_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, 1)
    return float(counter.get_total_flops())
