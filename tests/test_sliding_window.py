"""Window positions, the Gaussian map and the tile loop against nnU-Net v1's definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from uniseg_cli.inference.sliding_window import (
    WindowOptions,
    gaussian_importance,
    pad_to_patch,
    sliding_window,
    tile_starts,
)
from uniseg_cli.labels import Head
from uniseg_cli.model.network import UniSeg


def nnunet_steps(patch_size, image_size, step_size):
    """nnU-Net v1's ``_compute_steps_for_sliding_window``, as published."""
    target = [i * step_size for i in patch_size]
    num_steps = [int(np.ceil((i - k) / j)) + 1 for i, j, k in zip(image_size, target, patch_size)]
    steps = []
    for dim in range(len(patch_size)):
        max_step_value = image_size[dim] - patch_size[dim]
        actual = max_step_value / (num_steps[dim] - 1) if num_steps[dim] > 1 else 99999999999
        steps.append([int(np.round(actual * i)) for i in range(num_steps[dim])])
    return steps


@pytest.mark.parametrize("image_size", [(64, 192, 192), (65, 193, 400), (112, 202, 244), (200, 512, 512)])
@pytest.mark.parametrize("step", [0.5, 0.75, 1.0, 0.33])
def test_tile_starts_equal_nnunet(image_size, step):
    patch = (64, 192, 192)
    starts = tile_starts(image_size, patch, step)
    assert starts == nnunet_steps(patch, image_size, step)
    for axis_starts, size, p in zip(starts, image_size, patch):
        assert axis_starts[0] == 0 and axis_starts[-1] + p == size


def test_kidney_ct_is_twelve_tiles():
    assert [len(s) for s in tile_starts((112, 202, 244), (64, 192, 192), 0.5)] == [3, 2, 2]


def test_smaller_images_are_padded_evenly_with_zeros():
    data = torch.ones(1, 10, 64, 70)
    padded, crop = pad_to_patch(data, (32, 64, 64))
    assert padded.shape == (1, 32, 64, 70)
    assert crop == (slice(11, 21), slice(0, 64), slice(0, 70))
    assert padded.sum() == data.sum() and torch.equal(padded[(slice(None), *crop)], data)
    with pytest.raises(ValueError, match="smaller than the patch"):
        tile_starts((10, 64, 64), (32, 64, 64), 0.5)


def test_gaussian_equals_nnunet():
    for patch in [(64, 192, 192), (32, 64, 64), (5, 7, 9)]:
        impulse = np.zeros(patch)
        impulse[tuple(i // 2 for i in patch)] = 1
        expected = gaussian_filter(impulse, [i / 8 for i in patch], 0, mode="constant", cval=0)
        expected = (expected / expected.max()).astype(np.float32)
        expected[expected == 0] = expected[expected != 0].min()
        ours = gaussian_importance(patch)
        assert np.array_equal(ours, expected) and ours.max() == 1 and ours.min() > 0


def test_one_tile_with_mirroring_is_the_average_of_eight_flipped_softmaxes(small_model, ct_patch):
    with torch.inference_mode():
        ours = sliding_window(small_model, ct_patch[0], [Head(1, 3)], WindowOptions(mirror=True, precision="fp32"))[0]
        expected = torch.zeros(3, 32, 64, 64)
        for r in range(4):
            for axes in itertools.combinations((2, 3, 4), r):
                flipped = torch.flip(ct_patch, axes) if axes else ct_patch
                p = torch.softmax(small_model(flipped, 1), dim=1)[:, :3]
                expected += (torch.flip(p, axes) if axes else p)[0] / 8
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def test_tta_flips_only_the_models_mirror_axes(small_model, ct_patch):
    from uniseg_cli.inference.sliding_window import mirror_combinations

    assert len(mirror_combinations((0, 1, 2))) == 8 and mirror_combinations(()) == [()]
    assert mirror_combinations((0, 1)) == [(), (2,), (3,), (2, 3)]             # z and y: left-right kept
    lateral = UniSeg(small_model.config.with_changes(mirror_axes=(0, 1))).eval()
    lateral.load_state_dict(small_model.state_dict())
    with torch.inference_mode():
        ours = sliding_window(lateral, ct_patch[0], [Head(1, 3)], WindowOptions(mirror=True, precision="fp32"))[0]
        expected = torch.zeros(3, 32, 64, 64)
        for axes in [(), (2,), (3,), (2, 3)]:
            flipped = torch.flip(ct_patch, axes) if axes else ct_patch
            p = torch.softmax(small_model(flipped, 1), dim=1)[:, :3]
            expected += (torch.flip(p, axes) if axes else p)[0] / 4
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)  # float32 rounding of the batched flips
        unmirrored = UniSeg(small_model.config.with_changes(mirror_axes=())).eval()
        unmirrored.load_state_dict(small_model.state_dict())
        plain = sliding_window(small_model, ct_patch[0], [Head(1, 3)], WindowOptions(mirror=False, precision="fp32"))[0]
        mirrored = WindowOptions(mirror=True, precision="fp32")
        assert torch.equal(sliding_window(unmirrored, ct_patch[0], [Head(1, 3)], mirrored)[0], plain)


def test_tasks_sharing_the_encoder_and_batched_tiles_change_nothing(small_model, ct_volume):
    data = torch.from_numpy(np.clip(ct_volume[30:80, 10:90, 20:110], -325, 325) / 650 + 0.5)[None].float()
    with torch.inference_mode():
        together = sliding_window(small_model, data, [Head(0, 3), Head(6, 2)],
                                  WindowOptions(mirror=False, step=0.5, precision="fp32"))
        alone = sliding_window(small_model, data, [Head(6, 2)],
                               WindowOptions(mirror=False, step=0.5, batch_size=3, precision="fp32"))
    assert together[0].shape == (3, 50, 80, 90) and together[1].shape == (2, 50, 80, 90)
    torch.testing.assert_close(together[1], alone[0], atol=1e-5, rtol=0)
    # Softmax restricted to the task's classes: each voxel's probabilities sum to at most 1.
    assert float(together[0].sum(0).max()) <= 1 + 1e-5


@pytest.mark.parametrize("mirror,batch_size", [(True, 1), (True, 3), (False, 2)])
def test_progress_counts_every_pass_over_a_tile(small_model, ct_volume, mirror, batch_size):
    data = torch.from_numpy(np.clip(ct_volume[30:80, 10:90, 20:110], -325, 325) / 650 + 0.5)[None].float()
    tiles = np.prod([len(s) for s in tile_starts(data.shape[1:], small_model.config.patch_size, 0.5)])
    reports = []
    with torch.inference_mode():
        sliding_window(small_model, data, [Head(1, 3)], WindowOptions(mirror=mirror, batch_size=batch_size,
                                                                    precision="fp32"),
                       on_progress=lambda done, total: reports.append((done, total)))
    passes = tiles * (8 if mirror else 1)
    assert {total for _, total in reports} == {passes} and reports[-1][0] == passes
    assert len(reports) == -(-tiles // batch_size) * (8 if mirror else 1)  # one report per mirror of a batch
    assert all(a < b for (a, _), (b, _) in zip(reports, reports[1:]))


def test_encoder_and_fusion_run_once_per_tile_for_several_tasks(small_model, ct_patch):
    calls = {"encoder": 0, "fusion": 0, "decoder": 0}
    small_model.conv_blocks_context[0].register_forward_hook(lambda *_: calls.__setitem__("encoder", calls["encoder"] + 1))
    small_model.fusion_layer.register_forward_hook(lambda *_: calls.__setitem__("fusion", calls["fusion"] + 1))
    small_model.tu[0].register_forward_hook(lambda *_: calls.__setitem__("decoder", calls["decoder"] + 1))
    with torch.inference_mode():
        sliding_window(small_model, ct_patch[0], [Head(0, 3), Head(1, 3), Head(6, 2)],
                       WindowOptions(mirror=False, precision="fp32"))
    assert calls == {"encoder": 1, "fusion": 1, "decoder": 3}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tile_loop_never_waits_for_the_gpu(small_model, ct_volume):
    """The host queues every tile without synchronising (no ``.item()``, no copy back per tile): torch
    raises on any synchronising call in "error" sync-debug mode."""
    import copy

    model = copy.deepcopy(small_model).cuda()
    data = torch.from_numpy(np.clip(ct_volume[30:80, 10:90, 20:110], -325, 325) / 650 + 0.5)[None].float().cuda()
    options = WindowOptions(mirror=True, step=0.5, precision="fp16")
    with torch.inference_mode():
        sliding_window(model, data, [Head(0, 3), Head(6, 2)], options)  # warm-up: lazy CUDA and cuDNN set-up syncs
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            outputs = sliding_window(model, data, [Head(0, 3), Head(6, 2)], options)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert [tuple(o.shape) for o in outputs] == [(3, 50, 80, 90), (2, 50, 80, 90)] and outputs[0].is_cuda


def test_overlapping_tiles_blend_as_a_gaussian_weighted_average(small_model, ct_volume):
    # Written out from nnU-Net's definition, without the module's helpers: every tile's softmax times
    # the Gaussian map, summed, divided by the summed maps. Uniform weights or a wrong tile grid fail.
    from uniseg_cli.model.blocks import inference_kernels

    patch = small_model.config.patch_size
    z, y, x = (s // 2 for s in ct_volume.shape)
    case = ct_volume[z - 24:z + 24, y - 50:y + 50, x - 50:x + 50]          # 48×100×100: 2×3×3 tiles at step 0.5
    data = torch.from_numpy((np.clip(case, -325, 325) + 325) / 650)[None].float()
    impulse = np.zeros(patch)
    impulse[tuple(p // 2 for p in patch)] = 1
    gaussian = gaussian_filter(impulse, [p / 8 for p in patch], 0, mode="constant", cval=0)
    gaussian = gaussian / gaussian.max()
    gaussian[gaussian == 0] = gaussian[gaussian != 0].min()
    starts = nnunet_steps(patch, case.shape, 0.5)
    assert [len(s) for s in starts] == [2, 3, 3]
    weighted, uniform = np.zeros((3, *case.shape)), np.zeros((3, *case.shape))
    weights, counts = np.zeros(case.shape), np.zeros(case.shape)
    with torch.inference_mode(), inference_kernels(torch.device("cpu")):
        for corner in itertools.product(*starts):
            window = tuple(slice(c, c + p) for c, p in zip(corner, patch))
            probs = torch.softmax(small_model(data[(slice(None), *window)][None], 1), dim=1)[0, :3].double().numpy()
            weighted[(slice(None), *window)] += probs * gaussian
            weights[window] += gaussian
            uniform[(slice(None), *window)] += probs
            counts[window] += 1
    with torch.inference_mode():
        ours = sliding_window(small_model, data, [Head(1, 3)], WindowOptions(mirror=False, step=0.5, precision="fp32"))[0]
    np.testing.assert_allclose(ours.numpy(), weighted / weights, atol=1e-5)   # float32 accumulation
    assert not np.allclose(ours.numpy(), uniform / counts, atol=1e-4)          # the check can tell them apart
