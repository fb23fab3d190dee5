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


def test_accumulating_elsewhere_gives_the_same_probabilities(small_model, ct_patch):
    with torch.inference_mode():
        here = sliding_window(small_model, ct_patch[0], [(1, 3)], WindowOptions(mirror=False))[0]
        there = sliding_window(small_model, ct_patch[0], [(1, 3)], WindowOptions(mirror=False),
                               accumulate_on=torch.device("cpu"))[0]
    assert torch.equal(here, there)


def test_out_of_accelerator_memory_falls_back_to_cpu_accumulation_only(coarse_model_dir, ct_volume, monkeypatch,
                                                                       caplog):
    import uniseg_cli.predictor as predictor
    from uniseg_cli.predictor import Segmenter

    segmenter = Segmenter(coarse_model_dir, device="cpu", window=WindowOptions(mirror=False))
    calls = []

    def accelerator_without_room(model, tensor, tasks, options, on_tile=None, accumulate_on=None):
        calls.append(accumulate_on)
        if accumulate_on is None:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return [torch.zeros((k, *tensor.shape[1:]), device=accumulate_on) for _, k in tasks]

    monkeypatch.setattr(predictor, "sliding_window", accelerator_without_room)
    # As if the network ran on an accelerator: "meta" stands in for it (tensors go there without memory).
    segmenter.device = torch.device("meta")
    with caplog.at_level("WARNING", logger="uniseg_cli"):
        prediction = segmenter.predict_array(ct_volume, (3.0, 3.0, 3.0), "spleen")
    assert calls == [None, torch.device("cpu")]   # retried with the accumulation, not the network, on the CPU
    assert "accumulating on the CPU (slower; the network stays on meta)" in caplog.text
    assert prediction.labels.shape == ct_volume.shape
    segmenter.device = torch.device("cpu")
    calls.clear()
    with pytest.raises(torch.OutOfMemoryError):   # on the CPU there is nothing to fall back to
        segmenter.predict_array(ct_volume, (3.0, 3.0, 3.0), "spleen")
    assert calls == [None]
