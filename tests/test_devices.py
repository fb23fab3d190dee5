"""One device picker, with clear errors for absent devices."""

from __future__ import annotations

import pytest
import torch

from uniseg_cli.devices import pick_device
from uniseg_cli.errors import DeviceError


def test_cpu_and_auto():
    assert pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert pick_device("auto").type == expected
    assert pick_device(" CPU ") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_absent_cuda_is_an_error_not_a_fallback(spec):
    with pytest.raises(DeviceError, match=f"device '{spec}' was asked for, but"):
        pick_device(spec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_index_out_of_range():
    with pytest.raises(DeviceError, match="CUDA GPU"):
        pick_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("spec", ["gpu", "cpu:0", "cuda:x", ""])
def test_unknown_device_spellings(spec):
    with pytest.raises(DeviceError, match="unknown device .*use auto"):
        pick_device(spec)
