"""Run settings: numeric precision (of inference and of training) and memory sizes."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

from uniseg_cli.errors import UsageError

PRECISIONS = ("auto", "fast", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(spec: str, device: torch.device) -> str:
    """The precision to run.

    ``auto`` (the default) is the faithful choice: fp16 autocast on CUDA, where it gave the fp32 label
    maps, and fp32 elsewhere. ``fast`` (what ``--fast`` picks) adds bf16 autocast on CPUs with native
    bf16 instructions, much faster per pass; it is not the default because its agreement with fp32
    could only be checked on the demo model and random weights, not the published ones
    (docs/benchmarks.md has both).
    """
    if spec not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {spec!r}")
    if spec in ("auto", "fast"):
        if device.type == "cuda":
            return "fp16"
        return "bf16" if spec == "fast" and device.type == "cpu" and native_bf16_cpu() else "fp32"
    if spec == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"{device} has no bfloat16 support; use --precision fp16 or fp32")
    return spec


TRAINING_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_training_precision(spec: str, device: torch.device) -> str:
    """The autocast precision of training steps (the weights, the optimiser and the loss stay fp32).

    ``auto``: the published recipe's mixed precision, fp16 with a gradient scaler on CUDA, and its CPU
    counterpart, bf16, where the CPU has native bf16 instructions (a training step of the small network
    is about 3× faster there, and bf16 needs no loss scaling); fp32 elsewhere. Unlike inference, a
    trained model has no published output to reproduce bit for bit, so the faster choice is the default.
    """
    if spec not in TRAINING_PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(TRAINING_PRECISIONS)}, got {spec!r}")
    if spec == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if device.type == "cpu" and native_bf16_cpu() else "fp32"
    if spec == "fp16" and device.type != "cuda":
        raise UsageError(f"--precision fp16 trains on CUDA only (with a gradient scaler); {device} can use bf16 or fp32")
    if spec == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"{device} has no bfloat16 support; use --precision fp16 or fp32")
    if spec == "bf16" and device.type not in ("cuda", "cpu"):
        raise UsageError(f"--precision bf16 trains on CUDA or the CPU; use fp32 on {device}")
    return spec


def native_bf16_cpu() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX-512 BF16 or AMX); without them bf16 is
    emulated and no faster than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """Autocast for bf16/fp16; for fp32 on CUDA, TF32 off so that fp32 means fp32 (as published)."""
    if precision in AUTOCAST_DTYPES:
        with torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision]):
            yield
        return
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``4G``, ``512M``, ``1.5GiB``, ``2000000`` → bytes (K/M/G/T are powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"--max-memory must be a size like 4G, 512M or 1.5GiB, got {text!r}")
    number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * 1024 ** " kmgt".index(unit or " "))
    if size <= 0:
        raise UsageError(f"--max-memory must be more than nothing, got {text!r}")
    return size
