"""Each pre-processing step against a plain reference: scikit-image's resize and nnU-Net v1's rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates
from skimage.transform import resize

from uniseg_cli.data.preprocessing import (
    CropInfo,
    axial_permutation,
    nearest_indices,
    nonzero_bbox,
    normalize,
    preprocess,
    resample_image,
    resample_probabilities,
    resampled_shape,
    separate_axis,
    uncrop,
)
from uniseg_cli.tasks import resolve_task


def nnunet_v1_resample(data, new_shape, order, axis):
    """nnU-Net v1's ``resample_data_or_seg`` for images, written out as published (float64 throughout)."""
    data = data.astype(float)
    kwargs = {"mode": "edge", "anti_aliasing": False}
    out = []
    for c in range(data.shape[0]):
        if axis is None:
            out.append(resize(data[c], new_shape, order, **kwargs))
            continue
        plane = [s for a, s in enumerate(new_shape) if a != axis]
        stacked = np.stack([resize(np.take(data[c], i, axis), plane, order, **kwargs)
                            for i in range(data.shape[1 + axis])], axis)
        if stacked.shape[axis] != new_shape[axis]:
            grids = np.mgrid[tuple(slice(0, s) for s in new_shape)].astype(float)
            scale = [o / n for o, n in zip(stacked.shape, new_shape)]
            coords = np.array([sc * (g + 0.5) - 0.5 for sc, g in zip(scale, grids)])
            stacked = map_coordinates(stacked, coords, order=0, mode="nearest")
        out.append(stacked)
    return np.stack(out).astype(np.float32)


def test_resampling_equals_nnunet_on_the_real_ct(ct_volume):
    crop = ct_volume[40:60, 30:70, 40:90][None]
    for spacing, target in [((3.0, 3.0, 3.0), (3.0, 1.5, 1.5)), ((3.0, 3.0, 3.0), (4.0, 2.0, 2.0)),
                            ((6.5, 0.78, 0.78), (3.0, 1.5, 1.5)), ((1.0, 1.0, 1.0), (8.0, 4.0, 4.0))]:
        shape = resampled_shape(crop.shape[1:], spacing, target)
        axis = separate_axis(spacing, target)
        ours = resample_image(crop, shape, order=3, axis=axis)
        theirs = nnunet_v1_resample(crop, shape, 3, axis)
        assert ours.dtype == torch.float32 and ours.shape == theirs.shape == (1, *shape)
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=1e-3)  # HU; float32 rounding only


def test_anisotropy_rule():
    assert separate_axis((6.5, 0.78, 0.78), (3, 1.5, 1.5)) == 0      # original anisotropic decides
    assert separate_axis((1, 1, 1), (8, 4, 4)) is None                 # neither > 3
    assert separate_axis((1, 1, 1), (4, 1, 1)) == 0                    # target anisotropic, original not
    assert separate_axis((0.24, 1.25, 1.25), (1, 1, 1)) is None        # two axes share the largest spacing
    assert separate_axis((1.0, 1.0, 3.0), (1, 1, 1)) is None           # a ratio of exactly 3 is not anisotropic
    assert separate_axis((0.5, 0.5, 3.0), (1, 1, 1)) == 2


@pytest.mark.parametrize("size_in,size_out", [(19, 57), (57, 19), (10, 5), (5, 10), (7, 7), (3, 8)])
def test_nearest_indices_match_map_coordinates(size_in, size_out):
    coords = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
    expected = map_coordinates(np.arange(size_in, dtype=float), [coords], order=0, mode="nearest")
    assert np.array_equal(nearest_indices(size_in, size_out), expected.astype(int))


@pytest.mark.parametrize("shape_from,shape_to,spacing,target", [
    ((20, 30, 40), (28, 45, 50), (3, 3, 3), (3, 1.5, 1.5)),     # joint trilinear
    ((10, 30, 40), (33, 30, 40), (1, 1, 1), (4, 1, 1)),         # separate axis 0
    ((25, 16, 16), (20, 33, 31), (1, 1, 1), (1, 1, 1)),         # down and up together
])
def test_probabilities_back_equal_scikit_image_order_1(shape_from, shape_to, spacing, target):
    rng = np.random.default_rng(0)
    probs = rng.random((2, *shape_from)).astype(np.float32)
    bbox = tuple(slice(0, s) for s in shape_to)
    info = CropInfo((0, 1, 2), shape_to, bbox, spacing, target)  # type: ignore[arg-type]
    ours = resample_probabilities(torch.from_numpy(probs), info).numpy()
    axis = info.separate_axis
    if axis is None:
        theirs = np.stack([resize(p.astype(float), shape_to, 1, mode="edge", anti_aliasing=False) for p in probs])
    else:
        theirs = nnunet_v1_resample(probs, shape_to, 1, axis)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_normalisation_constants():
    liver, brain = resolve_task("liver"), resolve_task("brain_tumor")
    ct = np.array([[[[-1000.0, -325.0, 0.0, 325.0, 2000.0]]]], dtype=np.float32)
    assert normalize(torch.from_numpy(ct), liver.channels).ravel().tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    rng = np.random.default_rng(1)
    mr = rng.normal(300, 40, size=(4, 4, 5, 6)).astype(np.float32)
    expected = [(c - c.astype(np.float64).mean()) / (c.astype(np.float64).std() + 1e-8) for c in mr]
    np.testing.assert_allclose(normalize(torch.from_numpy(mr.copy()), brain.channels).numpy(), np.stack(expected),
                               atol=1e-5)


def test_crop_and_uncrop_round_trip():
    data = np.zeros((2, 10, 12, 14), np.float32)
    data[0, 2:5, 3:4, 6:9] = 1
    data[1, 7, 10, 1] = -3
    box = nonzero_bbox(data)
    assert box == (slice(2, 8), slice(3, 11), slice(1, 9))
    assert nonzero_bbox(np.zeros((1, 3, 4, 5))) == (slice(0, 3), slice(0, 4), slice(0, 5))
    info = CropInfo((0, 1, 2), (10, 12, 14), box, (1, 1, 1), (1, 1, 1))
    labels = (data[0][box] > 0).astype(np.uint8)
    assert np.array_equal(uncrop(labels, info), (data[0] > 0).astype(np.uint8))


def test_axial_permutation_is_undone_exactly():
    assert axial_permutation((2, 1, 0)) == (0, 1, 2)                  # axial: identity
    perm = axial_permutation((0, 2, 1))                               # sagittal-like storage
    assert perm == (1, 2, 0)
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, size=(5, 6, 7), dtype=np.uint8)
    permuted = labels.transpose(perm)
    info = CropInfo(perm, permuted.shape, tuple(slice(0, s) for s in permuted.shape), (1, 1, 1), (1, 1, 1))
    assert np.array_equal(uncrop(permuted, info), labels)


def test_preprocess_kidney_on_the_real_ct(ct_volume):
    kidney = resolve_task("kidney")
    x, info = preprocess(ct_volume[None].copy(), (3.0, 3.0, 3.0), (2, 1, 0), kidney.channels, kidney.target_spacing)
    assert info.cropped_shape == (112, 101, 122)                      # the CT has no zero border
    assert x.shape == (1, 112, 202, 244) and x.dtype == torch.float32  # 3 mm -> 3 x 1.5 x 1.5 mm
    assert x.min() == 0.0 and x.max() == 1.0


def test_argmax_classes_equals_argmax_first_maximum_wins():
    from uniseg_cli.data.preprocessing import argmax_classes

    rng = np.random.default_rng(3)
    probs = torch.from_numpy(rng.random((3, 6, 7, 8)).astype(np.float32))
    probs[:, 0, 0, 0] = torch.tensor([0.2, 0.4, 0.4])        # a tie: the first maximum, as argmax
    labels = argmax_classes(probs)
    assert labels.dtype == torch.uint8 and torch.equal(labels.long(), probs.argmax(0))
    assert labels[0, 0, 0] == 1


@pytest.mark.parametrize("shape_from,shape_to,spacing,target", [
    ((20, 30, 40), (57, 45, 50), (1, 3, 3), (3, 1.5, 1.5)),     # joint, z upsampled
    ((10, 30, 40), (33, 30, 40), (1, 1, 1), (4, 1, 1)),         # separate axis 0
    ((25, 16, 16), (20, 33, 31), (1, 1, 1), (1, 1, 1)),         # z downsampled
])
def test_slab_export_equals_whole_volume_export(shape_from, shape_to, spacing, target):
    from uniseg_cli.data.preprocessing import argmax_classes, labels_from_probabilities

    rng = np.random.default_rng(4)
    probs = torch.from_numpy(rng.random((3, *shape_from)).astype(np.float32))
    info = CropInfo((0, 1, 2), shape_to, tuple(slice(0, s) for s in shape_to), spacing, target)  # type: ignore[arg-type]
    whole = resample_probabilities(probs, info)
    labels, kept = labels_from_probabilities(probs, info, keep=True, slab_bytes=3 * shape_to[1] * shape_to[2] * 4 * 4)
    assert labels.shape == shape_to and kept.shape == (3, *shape_to) and kept.dtype == np.float16
    np.testing.assert_allclose(kept.astype(np.float32), whole.numpy(), atol=1e-3)   # float16 storage
    assert (labels == argmax_classes(whole)).float().mean() > 0.9999                # rounding-order near-ties only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_preprocess_on_the_gpu_equals_the_cpu(ct_volume):
    kidney = resolve_task("kidney")
    arguments = (ct_volume[None].copy(), (3.0, 3.0, 3.0), (2, 1, 0), kidney.channels, kidney.target_spacing)
    on_cpu, _ = preprocess(*arguments)
    on_gpu, _ = preprocess(*arguments, device="cuda")
    assert on_gpu.is_cuda
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-5, rtol=0)


def test_uncropped_probabilities_are_certain_background_outside_the_crop():
    from uniseg_cli.data.preprocessing import CropInfo, uncrop

    info = CropInfo(permutation=(0, 1, 2), shape=(4, 5, 6), bbox=(slice(1, 3), slice(1, 4), slice(2, 5)),
                    spacing=(1.0, 1.0, 1.0), target_spacing=(1.0, 1.0, 1.0))
    probabilities = np.full((3, 2, 3, 3), 0.25, dtype=np.float16)
    full = uncrop(probabilities, info, fill_first=1)
    assert full.shape == (3, 4, 5, 6) and full.dtype == np.float16
    inside = (slice(None), *info.bbox)
    assert (full[inside] == 0.25).all()
    outside = np.ones((4, 5, 6), bool)
    outside[info.bbox] = False
    assert (full[0][outside] == 1).all() and (full[1:][:, outside] == 0).all()
