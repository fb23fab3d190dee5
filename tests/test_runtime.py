"""Precision choice and its effect on the sliding window."""

from __future__ import annotations

import pytest
import torch

from uniseg_cli.errors import UsageError
from uniseg_cli.runtime import keep_freed_memory, resolve_precision
from uniseg_cli.sliding_window import WindowOptions, sliding_window


def test_auto_precision_is_fp32_on_cpu_and_fp16_on_cuda():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(UsageError, match="--precision must be one of auto, fp32, bf16, fp16, got 'fp8'"):
        resolve_precision("fp8", torch.device("cpu"))


def test_bf16_window_accumulates_float32_close_to_fp32(small_model, ct_patch):
    with torch.inference_mode():
        full = sliding_window(small_model, ct_patch[0], [(1, 3)], WindowOptions(mirror=False))[0]
        half = sliding_window(small_model, ct_patch[0], [(1, 3)], WindowOptions(mirror=False, precision="bf16"))[0]
    assert half.dtype == torch.float32
    assert (half - full).abs().max() < 0.05 and not torch.equal(half, full)


def test_keeping_freed_memory_is_idempotent():
    first = keep_freed_memory()
    assert keep_freed_memory() == first
