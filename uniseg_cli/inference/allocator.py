"""How the command-line process gets memory for the network's activations.

Each 3D forward pass allocates and frees gigabytes of activations. With glibc's defaults every large
block is a fresh mmap, so every pass pays millions of 4 KiB page faults, a large share of a CPU pass.
Two remedies:

- transparent huge pages for torch's large allocations (torch's ``THP_MEM_ALLOC_ENABLE``): the memory
  goes back to the system after each pass, but every pass faults its activations in again (2 MB pages);
- glibc keeping freed memory for reuse (``mallopt``): no faults after the first pass, but the process
  keeps its peak, fragmented, until it exits.

``predict`` prefers memory: huge pages where the kernel offers them, because they bound memory on large
scans. Training repeats the same allocations for hours, so ``train`` and ``finetune`` prefer speed and
keep freed memory. The trade measured both ways is in docs/benchmarks.md. ``THP_MEM_ALLOC_ENABLE`` set
by the user decides for both: ``1`` huge pages, anything else keeps freed memory. This module does not
import torch: the huge-page switch must be set before torch allocates anything. Only command-line
processes are tuned; a library must not change its host's allocator silently.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

THP_VARIABLE = "THP_MEM_ALLOC_ENABLE"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_INT_MAX = 2**31 - 1  # mallopt takes a C int: trim only when 2 GiB lie free at the top of the heap
_chosen: str | None = None


def tune_allocator(prefer: str = "memory") -> str:
    """Choose once per process: ``"huge-pages"``, ``"keep-freed"`` or ``"default"`` (what it got).

    ``prefer``: ``"memory"`` (huge pages where offered) or ``"speed"`` (keep freed memory). A user's own
    ``THP_MEM_ALLOC_ENABLE`` decides: ``1`` huge pages, anything else keeps freed memory.
    """
    global _chosen
    if prefer not in ("memory", "speed"):
        raise ValueError(f"prefer must be 'memory' or 'speed', got {prefer!r}")
    if _chosen is None:
        _chosen = _choose(prefer)
        log.debug("memory for activations: %s", _chosen)
    return _chosen


def _choose(prefer: str) -> str:
    if not sys.platform.startswith("linux"):
        return "default"
    wanted = os.environ.get(THP_VARIABLE)
    if wanted is None and prefer == "memory" and "torch" not in sys.modules and huge_pages_offered():
        os.environ[THP_VARIABLE] = "1"
        return "huge-pages"
    if wanted == "1":
        return "huge-pages" if huge_pages_offered() else "default"
    return "keep-freed" if keep_freed_memory() else "default"


def huge_pages_offered() -> bool:
    """Whether the kernel gives transparent huge pages to memory that asks for them (madvise or always)."""
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def keep_freed_memory() -> bool:
    """Make glibc keep and reuse freed memory instead of returning every large block to the kernel, in
    one arena (per-thread arenas would each keep their own freed blocks, multiplying the peak)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return all(libc.mallopt(ctypes.c_int(option), ctypes.c_int(value)) == 1
                   for option, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX), (_M_ARENA_MAX, 1)))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
