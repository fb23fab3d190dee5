"""The channels-last bf16 CPU path (``UniSeg.set_channels_last``) against the fp32 published computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from uniseg_cli.model.blocks import CONTIGUOUS_NORM_BELOW, Conv3d, norm_activation


def _conv_outputs_layouts(model: nn.Module, x: torch.Tensor, task: int) -> tuple[torch.Tensor, list[bool]]:
    """The logits and, for every convolution, whether its output was channels-last."""
    layouts: list[bool] = []
    hooks = [m.register_forward_hook(lambda _m, _i, y: layouts.append(
        y.is_contiguous(memory_format=torch.channels_last_3d))) for m in model.modules() if isinstance(m, Conv3d)]
    try:
        logits = model(x, task)
    finally:
        for h in hooks:
            h.remove()
    return logits, layouts


def test_bf16_channels_last_pass_stays_channels_last_and_is_within_bf16_of_fp32(small_model, ct_patch):
    with torch.inference_mode():
        reference = small_model(ct_patch, 1)
        small_model.set_channels_last(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast, layouts = _conv_outputs_layouts(small_model, ct_patch, 1)
        small_model.set_channels_last(False)
        again = small_model(ct_patch, 1)
    assert layouts and all(layouts)                           # no convolution fell back to NCDHW
    fast = fast.float()
    error = (fast - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.05, error                            # bf16 through 20 layers: 0.029-0.038 (seeds 0-2)
    assert (fast.argmax(1) == reference.argmax(1)).float().mean() > 0.97
    assert torch.equal(again, reference)                      # back to contiguous: fp32 bit for bit again
    assert all(p.is_contiguous() for p in small_model.parameters())


@pytest.mark.parametrize("channels", [6, 20])                 # below CONTIGUOUS_NORM_BELOW and above
@pytest.mark.parametrize("batch", [1, 2])
def test_channels_last_norm_equals_instance_norm_in_values_and_gradients(batch, channels):
    torch.manual_seed(0)
    norm = nn.InstanceNorm3d(channels, eps=1e-5, affine=True)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(batch, channels, 5, 7, 9) * 3 + 1
    a = x.clone().requires_grad_()
    b = x.clone().contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    ya = norm_activation(a * 1, norm, nn.LeakyReLU(0.01, inplace=True))
    yb = norm_activation(b * 1, norm, nn.LeakyReLU(0.01, inplace=True))
    assert yb.is_contiguous(memory_format=torch.channels_last_3d) and not yb.is_contiguous()
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(ya)
    grads_a = torch.autograd.grad((ya * weights).sum(), [a, norm.weight, norm.bias])
    grads_b = torch.autograd.grad((yb * weights).sum(), [b, norm.weight, norm.bias])
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-4)
    if channels >= CONTIGUOUS_NORM_BELOW:
        # the gradient reaches the convolution before the norm channels-last too (the training step's backward
        # convolutions then need no reorder of their gradient, a copy of every full-resolution activation)
        assert grads_b[0].is_contiguous(memory_format=torch.channels_last_3d) and not grads_b[0].is_contiguous()


def _leave_nan_in_freed_memory() -> None:
    """Free tensors full of NaN, as earlier work in a long process does: the allocator hands their bytes on."""
    held = [torch.full((n,), float("nan"), dtype=dtype) for n in (1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18)
            for dtype in (torch.float32, torch.bfloat16) for _ in range(8)]
    del held


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 2, 2), (2, 4, 4), (2, 8, 8)])
def test_bf16_weight_gradients_of_thin_inputs_are_finite_when_freed_memory_holds_nan(shape, channels_last):
    """oneDNN's bf16 weight gradient reads unwritten memory when the input is 2 deep under a 3-deep kernel (the
    small configuration's bottleneck and prompt fusion): NaN weights after an epoch in long trainings and
    in whole test runs, never alone. Such convolutions run in fp32 and give fp32's gradients."""
    torch.manual_seed(0)
    conv = Conv3d(43, 43, 3, 1, 1)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 43, *shape)
    reference = torch.autograd.grad(conv(x).square().sum(), [conv.weight])[0]
    for _ in range(5):
        _leave_nan_in_freed_memory()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = conv(x).float().square().sum()
        (weight_grad,) = torch.autograd.grad(loss, [conv.weight])
        assert torch.isfinite(weight_grad).all()
        torch.testing.assert_close(weight_grad, reference, rtol=1e-4, atol=1e-3)


def test_bf16_convolutions_of_inputs_at_least_the_kernels_size_stay_bf16():
    conv = Conv3d(8, 8, 3, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(torch.randn(1, 8, 3, 3, 3)).dtype == torch.bfloat16
        assert conv(torch.randn(1, 8, 2, 8, 8)).dtype == torch.float32
        with torch.no_grad():                                 # inference: the forward pass is sound
            assert conv(torch.randn(1, 8, 2, 8, 8)).dtype == torch.bfloat16


def test_near_ties_are_recomputed_in_fp32_bit_for_bit_and_the_rest_stays_bf16(small_model, ct_volume):
    """``bf16-checked``: every voxel whose bf16 decision is within the margin (and its neighbours)
    gets exactly the fp32 pass's probabilities, because every tile covering it is recomputed; the others
    keep bf16's."""
    from uniseg_cli.inference.sliding_window import WindowOptions, sliding_window
    from uniseg_cli.labels import Head

    data = torch.from_numpy(np.clip(ct_volume[30:80, 10:90, 20:180], -325, 325) / 650 + 0.5)[None].float()
    margin = 0.004
    with torch.inference_mode():
        full, half, mixed = (sliding_window(small_model, data, [Head(1, 3)], WindowOptions(
            mirror=False, precision=p, near_tie=t))[0] for p, t in (("fp32", None), ("bf16", 0.0), ("bf16", margin)))
    as_fp32 = (mixed == full).all(0)
    as_bf16 = (mixed == half).all(0)
    assert (as_fp32 | as_bf16).all()                          # each voxel is one pass's or the other's
    top = half.topk(2, dim=0).values
    assert as_fp32[top[0] - top[1] < margin].all()            # every near tie is fp32's
    assert as_bf16[~as_fp32].any() and as_fp32.any()          # and only the tiles holding one were redone


def test_bf16_checked_gives_the_trained_demo_models_fp32_label_map():
    from conftest import CT

    from uniseg_cli.inference.predictor import Segmenter
    from uniseg_cli.inference.sliding_window import WindowOptions
    from uniseg_cli.io.images import read_channels

    data, geometry = read_channels([CT])
    maps = {}
    for name, window in (("fp32", WindowOptions(mirror=False, precision="fp32")),
                         ("checked", WindowOptions(mirror=False, precision="bf16-checked"))):
        segmenter = Segmenter("uniseg-demo", device="cpu", window=window)
        maps[name] = segmenter.predict_array(data, geometry.spacing, "kidney",
                                             axis_world=geometry.array_axis_world()).labels
    assert (maps["fp32"] == 1).sum() > 10_000                 # the kidneys are there
    assert np.array_equal(maps["checked"], maps["fp32"])


def test_verbose_predict_logs_the_precision_chosen_why_and_the_tiles_redone(run_cli, tmp_path):
    from conftest import CT

    code, _, err = run_cli("-v", "predict", CT, "--task", "kidney", "-m", "uniseg-demo", "--no-tta", "--device", "cpu",
                           "--precision", "bf16-checked", "-o", tmp_path / "kidney.nii.gz")
    assert code == 0, err
    assert "precision bf16 (--precision bf16-checked: tiles holding a near tie (margin < 0.2) again in fp32)" in err
    assert "on cpu (bf16, fp32 near ties, TTA off, step 0.5)" in err
    assert " of 54 tiles hold a near tie (margin < 0.2, " in err
    code, _, err = run_cli("-v", "predict", CT, "--task", "kidney", "-m", "uniseg-demo", "--no-tta", "--device", "cpu",
                           "-o", tmp_path / "default.nii.gz")
    assert code == 0, err
    assert "DEBUG: precision fp32 (auto: fp32" in err and "tiles hold a near tie" not in err
