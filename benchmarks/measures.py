"""What the benchmarks measure, in one place: label-map agreement, the FLOPs of a forward pass and the speed of
single 3×3×3 convolutions.

Imports nothing heavy at module level, so that a benchmark can still choose the allocator before torch loads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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


def best_seconds(work: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``work``, after one untimed call (oneDNN sets its kernel up there)."""
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def conv3x3_operands(channels: int, size: tuple[int, ...], *, batch: int = 1, dtype: Any = None,
                     channels_last: bool = False) -> tuple[Any, Any, float]:
    """Input and weight of a ``channels``→``channels`` 3×3×3 convolution over ``size`` (random, in ``dtype``
    and the layout asked for) and its FLOPs (2 × multiply-adds, padding counted as the convolution does)."""
    import torch

    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    dtype = dtype or torch.float32
    x = torch.randn(batch, channels, *size).to(dtype).contiguous(memory_format=layout)
    weight = torch.randn(channels, channels, 3, 3, 3).to(dtype).contiguous(memory_format=layout)
    return x, weight, 2.0 * channels * channels * 27 * x[:, 0].numel()
