"""Run settings: numeric precision (of inference and of training) and memory sizes."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from uniseg_cli.errors import UsageError

PRECISIONS = ("auto", "fast", "fp32", "bf16", "bf16-checked", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


#: A voxel whose two likeliest classes (or a region's probability and 0.5) lie closer than this in a bf16
#: pass is a near tie that bf16's rounding may decide differently from fp32; ``bf16-checked`` recomputes
#: the tiles holding one in fp32 (``sliding_window``). More than twice the largest bf16-fp32 probability
#: difference measured on trained models (docs/benchmarks.md, "CPU bf16 channels-last").
NEAR_TIE_MARGIN = 0.2


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses and why (``uniseg -v predict`` logs both). ``near_tie``: recompute in fp32 the
    tiles holding a voxel decided by less than this margin (0: never)."""

    precision: str
    why: str
    near_tie: float = 0.0


def choose_precision(spec: str, device: torch.device) -> PrecisionChoice:
    """The inference precision for ``--precision spec`` on ``device``.

    ``auto`` (the default) is the faithful choice: fp16 autocast on CUDA, where it gave fp32's label maps,
    and fp32 elsewhere. ``fast`` (what ``--fast`` picks) is the fastest with measured agreement: on a CPU
    with bf16 matrix units (AMX, or AVX-512 BF16 dot products) bf16 in the channels-last layout, 2.3× fp32
    per published-size pass on AVX-512 BF16. bf16 is not ``auto`` on those CPUs because it moved up to
    7% of a trained model's smallest structure, and ``bf16-checked``, which recomputes the tiles holding a
    near tie in fp32 and so gave fp32's maps, was no faster than fp32 on the trained models measured
    (their structures reach half or all of the tiles; docs/benchmarks.md). The CPU's feature flags
    decide, not a timing probe: a probe costs start-up time and, on a shared machine, could pick
    differently from one run to the next and so give a different label map for the same command.
    ``fp32`` is the published computation bit for bit (on CUDA with TF32 off).
    """
    if spec not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {spec!r}")
    if spec in ("bf16", "bf16-checked") and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"{device} has no bfloat16 support; use --precision fp16 or fp32")
    if spec == "bf16-checked":
        return PrecisionChoice("bf16", f"--precision bf16-checked: tiles holding a near tie (margin < "
                                       f"{NEAR_TIE_MARGIN}) again in fp32", NEAR_TIE_MARGIN)
    if spec not in ("auto", "fast"):
        return PrecisionChoice(spec, "--precision " + spec)
    if device.type == "cuda":
        return PrecisionChoice("fp16", f"{spec}: fp16 autocast on CUDA")
    if device.type != "cpu":
        return PrecisionChoice("fp32", f"{spec}: fp32 on {device.type}")
    units = cpu_bf16_units()
    if spec == "fast" and units:
        return PrecisionChoice("bf16", f"fast: this CPU has bf16 matrix units ({units}): bf16, channels-last")
    if units:
        return PrecisionChoice("fp32", f"auto: fp32 on the CPU, the published computation (this CPU has {units}: "
                                       "--fast or --precision bf16 is faster, with slightly different maps)")
    if cpu_bf16_units(capped=False):
        return PrecisionChoice("fp32", f"{spec}: fp32 (ONEDNN_MAX_CPU_ISA={onednn_isa_cap()} keeps oneDNN from "
                                       f"this CPU's bf16 matrix units ({cpu_bf16_units(capped=False)}), without "
                                       "which bf16 is slower)")
    return PrecisionChoice("fp32", f"{spec}: fp32 (this CPU has no bf16 matrix units, no AMX or AVX-512 BF16, "
                                   "where bf16 is slower)")


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


#: oneDNN's ISA levels as bit masks (its ``dnnl_cpu_isa_t``), for ``ONEDNN_MAX_CPU_ISA``: a level includes
#: every level whose bits it holds.
ONEDNN_ISA_MASKS = {"SSE41": 0x1, "AVX": 0x3, "AVX2": 0x7, "AVX2_VNNI": 0xF, "AVX2_VNNI_2": 0x1F,
                    "AVX512_CORE": 0x27, "AVX512_CORE_VNNI": 0x67, "AVX512_CORE_BF16": 0xE7,
                    "AVX10_1_512": 0x1EF, "AVX512_CORE_FP16": 0x1EF, "AVX10_1_512_AMX": 0xFEF,
                    "AVX512_CORE_AMX": 0xFEF, "AVX10_1_512_AMX_FP16": 0x1FEF, "AVX512_CORE_AMX_FP16": 0x1FEF}
_BF16_UNITS = (("AMX", "_is_amx_tile_supported", "AVX512_CORE_AMX"),
               ("AVX-512 BF16", "_is_avx512_bf16_supported", "AVX512_CORE_BF16"))


def cpu_bf16_units(capped: bool = True) -> str:
    """The CPU's bf16 matrix units that oneDNN's convolutions may use ("AMX", "AVX-512 BF16"; "" without:
    there bf16 is emulated and slower than fp32).

    The CPU's flags as torch's own capability checks read them, capped by ``ONEDNN_MAX_CPU_ISA`` (or its
    older name ``DNNL_MAX_CPU_ISA``) where that is set: a container or a user that caps oneDNN at AVX2 gets
    the AVX2 choice, since oneDNN then does not use the bf16 units and bf16 costs more than fp32 (the
    flags alone would pick bf16 there). An unknown value caps nothing,
    as in oneDNN. ``capped=False``: the flags alone.
    """
    allowed = ONEDNN_ISA_MASKS.get(onednn_isa_cap()) if capped else None
    for name, check, level in _BF16_UNITS:
        needed = ONEDNN_ISA_MASKS[level]
        if getattr(torch.cpu, check, lambda: False)() and (allowed is None or allowed & needed == needed):
            return name
    return ""


def onednn_isa_cap() -> str:
    """The ISA cap set for oneDNN in the environment (upper case; "" where none is set)."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()


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
