"""Run settings: numeric precision (of inference and of training) and memory sizes."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from uniseg_cli.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses and why (``predict -v`` logs both)."""

    precision: str
    why: str


def choose_precision(spec: str, device: torch.device) -> PrecisionChoice:
    """The inference precision for ``--precision spec`` on ``device``.

    ``auto`` (the default): fp16 autocast on CUDA, where it gave fp32's label maps; on a CPU with bf16
    matrix units (AMX, or AVX-512 BF16 dot products) bf16 in the channels-last layout, 2-9× faster per
    pass there with label maps that agree with fp32's (docs/benchmarks.md); fp32 on every other CPU,
    where bf16 is emulated and slower, and on MPS. The CPU's feature flags decide, not a timing probe:
    a probe costs start-up time and, on a shared machine, could pick differently from one run to the
    next and so give a different label map for the same command. ``fp32`` is the published
    computation bit for bit (on CUDA with TF32 off).
    """
    if spec not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {spec!r}")
    if spec != "auto":
        if spec == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UsageError(f"{device} has no bfloat16 support; use --precision fp16 or fp32")
        return PrecisionChoice(spec, "--precision " + spec)
    if device.type == "cuda":
        return PrecisionChoice("fp16", "auto: fp16 autocast on CUDA")
    if device.type == "cpu":
        units = cpu_bf16_units()
        if units:
            return PrecisionChoice("bf16", f"auto: this CPU has bf16 matrix units ({units}): bf16, channels-last")
        return PrecisionChoice("fp32", "auto: this CPU has no bf16 matrix units (no AMX, no AVX-512 BF16), where "
                                       "bf16 is slower than fp32")
    return PrecisionChoice("fp32", f"auto: fp32 on {device.type}")


def resolve_precision(spec: str, device: torch.device) -> str:
    """``choose_precision(spec, device).precision``."""
    return choose_precision(spec, device).precision


def channels_last(precision: str, device: torch.device) -> bool:
    """Whether the network runs channels-last (``UniSeg.set_channels_last``): bf16 on the CPU, where
    oneDNN's bf16 convolutions are native to that layout. fp32 stays contiguous, as published; CUDA keeps
    the layout it was measured with."""
    return precision == "bf16" and device.type == "cpu"


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


def cpu_bf16_units() -> str:
    """The CPU's bf16 matrix units as torch's own CPU-capability checks see them ("AMX", "AVX-512 BF16";
    "" without: there bf16 is emulated and slower than fp32)."""
    checks = (("AMX", "_is_amx_tile_supported"), ("AVX-512 BF16", "_is_avx512_bf16_supported"))
    return next((name for name, check in checks if getattr(torch.cpu, check, lambda: False)()), "")


def native_bf16_cpu() -> bool:
    """Whether this CPU has bf16 matrix units (``cpu_bf16_units``)."""
    return bool(cpu_bf16_units())


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
