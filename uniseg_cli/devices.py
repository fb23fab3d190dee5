"""The one device picker: every command's ``--device`` goes through ``pick_device``."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from uniseg_cli.errors import DeviceError

if TYPE_CHECKING:
    import torch

DEVICE_HELP = "auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps"

_SPEC = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def pick_device(spec: str = "auto") -> "torch.device":
    """The torch device for ``spec``; an absent device is an error, never a silent fallback."""
    import torch

    match = _SPEC.match(spec.strip().lower())
    if not match or (match.group(2) is not None and match.group(1) != "cuda"):
        raise DeviceError(f"unknown device {spec!r}; use {DEVICE_HELP}")
    kind, index = match.group(1), match.group(2)
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not _mps_available():
            raise DeviceError("device 'mps' was asked for, but Apple's Metal backend is not available here")
        return torch.device("mps")
    if not torch.cuda.is_available():
        build = f"this torch {torch.__version__} has no CUDA support" if torch.version.cuda is None \
            else "no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES and the driver)"
        raise DeviceError(f"device {spec!r} was asked for, but {build}")
    count = torch.cuda.device_count()
    gpu = int(index) if index is not None else torch.cuda.current_device()
    if gpu >= count:
        raise DeviceError(f"device {spec!r} was asked for, but only {count} CUDA GPU(s) are visible (cuda:0…cuda:{count - 1})")
    return torch.device("cuda", gpu)
