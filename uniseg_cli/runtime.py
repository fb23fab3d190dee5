"""Process-level settings that make inference fast: numeric precision and the CPU memory allocator."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import re
import sys
from collections.abc import Iterator

import torch

from uniseg_cli.errors import UsageError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(spec: str, device: torch.device) -> str:
    """The precision to run: ``auto`` is fp16 autocast on CUDA and fp32 elsewhere.

    Reduced precision becomes a default only where label maps were shown to agree with fp32 (Dice ≥ 0.99
    per class). On an H100, fp16 autocast with TTA gave Dice 0.997/0.998 against fp32 on the realistic
    CT at 2.7× the sliding-window speed; bf16 gave 0.967/0.980 and stays opt-in, on GPUs and CPUs alike
    (see the README's benchmarks).
    """
    if spec not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {spec!r}")
    if spec == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if spec == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"{device} has no bfloat16 support; use --precision fp16 or fp32")
    return spec


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """Autocast for bf16/fp16; for fp32 on CUDA, TF32 off so that fp32 means fp32 (as published)."""
    if precision in _DTYPES:
        with torch.autocast(device.type, dtype=_DTYPES[precision]):
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
    return int(number * 1024 ** " kmgt".index(unit or " "))


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_tuned = False


def keep_freed_memory() -> bool:
    """Make glibc keep and reuse freed memory instead of returning every large block to the kernel.

    Each 3D forward pass allocates and frees gigabytes of activations; by default glibc serves them with
    fresh mmaps, so every pass pays millions of page faults (measured: 4.9 s of kernel time in a 7.3 s
    forward on 2 cores, 5.0-6.1 s per forward with this setting). The cost is that the process keeps its
    peak memory until it exits. Only for the command-line process; a library must not change it silently.
    """
    global _tuned
    if _tuned or not sys.platform.startswith("linux"):
        return _tuned
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 40) == 1
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        ok = False
    _tuned = ok
    log.debug("glibc allocator keeps freed memory: %s", ok)
    return ok
