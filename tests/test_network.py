"""The network is the published one: state-dict format, shapes, layer order and hyper-parameters."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DATA
from reference_forward import reference_forward
from torch import nn

from uniseg_cli.config import UniSegConfig, small_config
from uniseg_cli.errors import InputShapeError
from uniseg_cli.model.network import UniSeg


def published_keys() -> list[tuple[str, tuple[int, ...]]]:
    rows = [line.rstrip("\n").split("\t") for line in (DATA / "uniseg_state_dict_keys.tsv").read_text().splitlines()
            if line and not line.startswith("#")]
    return [(name, tuple(int(v) for v in shape.strip("()").split(",") if v.strip())) for name, shape, *_ in rows]


@pytest.fixture(scope="module")
def published_on_meta() -> UniSeg:
    with torch.device("meta"):
        return UniSeg(UniSegConfig())


def test_default_state_dict_is_the_published_list_in_order(published_on_meta):
    expected = published_keys()
    assert len(expected) == 115
    got = [(k, tuple(v.shape)) for k, v in published_on_meta.state_dict().items()]
    assert got == expected


def test_published_layout_state_dict_loads_with_nothing_missing_or_unexpected(published_on_meta):
    state = {name: torch.zeros(shape, device="meta") for name, shape in published_keys()}
    result = published_on_meta.load_state_dict(state, strict=False, assign=True)
    assert result.missing_keys == [] and result.unexpected_keys == []


def test_default_forward_shapes_with_and_without_deep_supervision(published_on_meta):
    x = torch.empty(2, 1, 64, 192, 192, device="meta")
    published_on_meta.train()
    outputs = published_on_meta(x, 1)
    assert [tuple(o.shape) for o in outputs] == [
        (2, 4, 64, 192, 192), (2, 4, 64, 96, 96), (2, 4, 32, 48, 48), (2, 4, 16, 24, 24), (2, 4, 8, 12, 12)
    ]
    published_on_meta.eval()
    assert tuple(published_on_meta(x, 1).shape) == (2, 4, 64, 192, 192)


def test_hyper_parameters_are_the_published_ones(small_model):
    norms = [m for m in small_model.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert norms and all(m.eps == 1e-5 and m.affine and not m.track_running_stats for m in norms)
    acts = [m for m in small_model.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == len(norms) and all(m.negative_slope == 0.01 for m in acts)
    assert not any(isinstance(m, nn.Dropout) for m in small_model.modules())
    assert all(m.bias is None for m in small_model.tu) and all(m.bias is None for m in small_model.seg_outputs)
    convs = [m for n, m in small_model.named_modules() if isinstance(m, nn.Conv3d) and not n.startswith("seg_outputs")]
    assert all(m.bias is not None for m in convs)


def test_he_initialisation(small_model):
    for module in small_model.modules():
        if isinstance(module, nn.Conv3d) and module.bias is not None:
            assert torch.all(module.bias == 0)
    weight = small_model.conv_blocks_localization[0][0].blocks[0].conv.weight  # 64·27 fan-in, 32·1728 values
    fan_in = weight.shape[1] * math.prod(weight.shape[2:])
    expected_std = math.sqrt(2.0 / (1 + 0.01**2) / fan_in)
    assert weight.std().item() == pytest.approx(expected_std, rel=0.05)


@pytest.mark.parametrize("task", [0, 1, 9])
def test_forward_equals_the_functional_reference_on_a_real_ct_patch(small_model, ct_patch, task):
    sd = small_model.state_dict()
    with torch.no_grad():
        assert torch.allclose(small_model(ct_patch, task), reference_forward(sd, ct_patch, task)[0], atol=1e-5)
        small_model.train()
        ours = small_model(ct_patch, task)
    theirs = reference_forward(sd, ct_patch, task)
    assert len(ours) == 5
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


def test_tasks_get_different_outputs_from_the_same_features(small_model, ct_patch):
    with torch.no_grad():
        features = small_model.encode(ct_patch)
        first, second = small_model.decode(features, 0), small_model.decode(features, 1)
    assert not torch.allclose(first, second)
    assert torch.equal(first, small_model(ct_patch, 0))


@pytest.mark.parametrize("channels,conv", [(1, "conv_1"), (2, "conv_2"), (4, "conv_4")])
def test_channel_count_selects_the_input_convolution(small_model, channels, conv):
    used = []
    for n in (1, 2, 4):
        getattr(small_model.conv_blocks_context[0].blocks[0], f"conv_{n}").register_forward_hook(
            lambda m, i, o, n=n: used.append(f"conv_{n}"))
    with torch.no_grad():
        small_model(torch.randn(1, channels, 32, 64, 64), 0)
    assert used == [conv]


def test_other_channel_counts_and_shapes_are_refused(small_model):
    with pytest.raises(InputShapeError, match="takes 1, 2, 4 input channels, got 3"):
        small_model(torch.randn(1, 3, 32, 64, 64), 0)
    with pytest.raises(InputShapeError, match=r"exactly \(32, 64, 64\) voxels"):
        small_model(torch.randn(1, 1, 32, 64, 96), 0)
    with pytest.raises(InputShapeError, match="task index 11 is out of range"):
        small_model(torch.randn(1, 1, 32, 64, 64), 11)
    with pytest.raises(InputShapeError, match="5-D"):
        small_model(torch.randn(1, 32, 64, 64), 0)


def test_small_config_is_small_and_keeps_a_bottleneck():
    config = small_config()
    assert config.prompt_shape == (2, 2, 2)
    assert config.stage_features == (4, 8, 16, 32, 32, 32)
    assert sum(p.numel() for p in UniSeg(config).parameters()) < 500_000


def test_published_configuration_forward_equals_the_reference_on_the_real_ct(ct_volume):
    """The full-size default network (32 M parameters) on one 64×192×192 patch of the real CT."""
    import numpy as np

    torch.manual_seed(0)
    model = UniSeg(UniSegConfig()).eval()
    z0 = ct_volume.shape[0] // 2 - 32
    crop = np.clip(ct_volume[z0:z0 + 64, :192, :192], -325, 325)
    patch = np.zeros((64, 192, 192), np.float32)  # the CT is 101×122 in-plane: zero-padded, as inference pads
    patch[:, :crop.shape[1], :crop.shape[2]] = (crop + 325) / 650
    x = torch.from_numpy(patch)[None, None]
    with torch.inference_mode():
        ours = model(x, 1)
        theirs = reference_forward(model.state_dict(), x, 1)[0]
    assert ours.shape == (1, 4, 64, 192, 192)
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_inference_kernels_give_the_same_logits_without_the_im2col_fallback(small_model, ct_patch):
    """A one-patch inference of a small model must not fall back to slow_conv3d (9× slower), nor change
    the logits beyond summation order; outside inference (and under autocast) the plain path runs."""
    from uniseg_cli.model.blocks import inference_kernels

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    with torch.no_grad():
        plain = small_model(ct_patch, 1)
        with inference_kernels(torch.device("cpu")), torch.profiler.profile() as prof:
            fast = small_model(ct_patch, 1)
        with inference_kernels(torch.device("cpu")), torch.autocast("cpu", dtype=torch.bfloat16):
            assert small_model(ct_patch, 1).dtype == torch.bfloat16  # autocast still decides
    ops = {event.key for event in prof.key_averages()}
    assert "aten::mkldnn_convolution" in ops and "aten::slow_conv3d_forward" not in ops
    assert torch.allclose(fast, plain, atol=1e-4)
    with inference_kernels(torch.device("cpu")):
        out = small_model(ct_patch, 1)  # gradients on: training keeps torch's own choice
    out.sum().backward()
    assert small_model.seg_outputs[-1].weight.grad is not None
