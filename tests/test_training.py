"""`uniseg train`: sampling, augmentation geometry, the loss, training on real data, resume, DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from uniseg_cli.training.trainer import TrainOptions

FAST = dict(batches_per_task=3, batch_size=2, workers=0, device="cpu", progress=False)
FP32 = dict(FAST, precision="fp32")  # exact comparisons: bf16 kernels may reorder sums between runs


# ------------------------------------------------------------------------------------- sampling
def test_epoch_schedule_gives_every_task_the_same_number_of_batches():
    from uniseg_cli.training.sampling import EpochSampler, epoch_schedule

    schedule = epoch_schedule(5, 50, epoch=3, seed=1)
    assert Counter(schedule) == {t: 50 for t in range(5)}
    assert schedule != sorted(schedule) and schedule != epoch_schedule(5, 50, epoch=4, seed=1)
    ranks = [EpochSampler(5, 50, 1, rank=r, world=2) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(3)
    items = sorted(i for s in ranks for i in s.items())
    assert [task for _, _, task in items] == schedule[:250] and len(ranks[0]) == 125


def test_last_third_of_each_batch_holds_foreground_and_patches_stay_inside_the_image(kidney_prep):
    from uniseg_cli.data.training_cache import read_plan
    from uniseg_cli.training.sampling import PatchBatches, forced_foreground

    assert forced_foreground(2) == [False, True] and forced_foreground(3) == [False, False, True]
    data = read_plan(kidney_prep)
    batches = PatchBatches(data, [["ct1", "ct2"]], (32, 64, 64), 3, seed=0, spatial=None)
    random_hits = 0
    for index in range(20):
        batch = batches[(0, index, 0)]
        assert batch["task"] == 0 and all(m is None for m in batch["matrices"])
        assert all(tuple(x.shape) == (1, 32, 64, 64) for x in batch["images"])
        assert batch["classes"][:2] == [None, None] and batch["classes"][2] == 1
        assert batch["labels"][2].eq(1).any()                           # forced: holds kidney
        random_hits += sum(int(lab.any()) for lab in batch["labels"][:2])
    assert random_hits < 40                                             # the others are not all forced
    again = batches[(0, 7, 0)]
    assert torch.equal(again["images"][0], batches[(0, 7, 0)]["images"][0])   # (epoch, index) decides


def test_patches_lie_inside_the_image_or_centred_where_it_is_narrower():
    """As nnU-Net's loader: no patch reaches outside an image at least a patch wide, so training sees no
    zero padding that the sliding window would not show; a narrower axis is padded evenly."""
    from uniseg_cli.training.sampling import PatchBatches

    batches = PatchBatches([], [], (8, 8, 8), 1, seed=0, spatial=None)
    rng = np.random.default_rng(0)
    shape = (20, 12, 6)                                                 # the last axis narrower than a patch
    corner = np.array([[0, 0, 0]])
    starts = []
    for forced in (False, True):
        for _ in range(300):
            centre, _ = batches._centre(rng, {1: corner, 2: np.array([[19, 11, 5]])}, shape, forced)
            starts.append(centre - 4)
    starts = np.array(starts)
    assert starts[:, 0].min() == 0 and starts[:, 0].max() == 12 and starts[:, 1].max() == 4
    assert set(starts[:, 2]) == {-1}                                    # 6 wide: one voxel of padding each side


# --------------------------------------------------------------------------------- augmentation
def test_spatial_transform_identity_and_quarter_turn():
    from uniseg_cli.training.augment import spatial_transform
    from uniseg_cli.training.sampling import rotation_matrix

    rng = np.random.default_rng(0)
    crop = torch.from_numpy(rng.normal(size=(1, 9, 11, 11)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 3, size=(9, 11, 11)))
    image, seg = spatial_transform(crop, labels, torch.eye(3), (5, 7, 7))
    np.testing.assert_allclose(image.numpy(), crop[:, 2:7, 2:9, 2:9].numpy(), atol=1e-5)
    assert torch.equal(seg, labels[2:7, 2:9, 2:9])
    quarter = torch.from_numpy(rotation_matrix((math.pi / 2, 0, 0)).astype(np.float32))
    image, seg = spatial_transform(crop, labels, quarter, (5, 7, 7))
    # output (dz, dy, dx) reads source (dz, -dx, dy): a quarter turn in the y-x plane
    expected = np.rot90(crop[:, 2:7, 2:9, 2:9].numpy(), k=1, axes=(3, 2))
    np.testing.assert_allclose(image.numpy(), expected, atol=1e-4)
    assert np.array_equal(seg.numpy(), np.rot90(labels[2:7, 2:9, 2:9].numpy(), k=1, axes=(2, 1)))


def test_intensity_augmentation_keeps_labels_and_shapes():
    from uniseg_cli.training.augment import intensity_and_mirror

    image = torch.rand(2, 8, 16, 16)
    labels = (image[0] > 0.5).long()
    for seed in range(30):
        out, seg = intensity_and_mirror(image, labels, np.random.default_rng(seed), torch.Generator().manual_seed(seed))
        assert out.shape == image.shape and torch.isfinite(out).all()
        assert seg.sum() == labels.sum()                                   # mirroring only moves labels


def test_mirroring_keeps_to_the_allowed_axes():
    from uniseg_cli.training.augment import intensity_and_mirror

    labels = torch.arange(8 * 16 * 16).reshape(8, 16, 16)                   # every voxel its own value
    image = labels[None].float()
    seen = set()
    for seed in range(40):
        _, seg = intensity_and_mirror(image, labels, np.random.default_rng(seed), torch.Generator().manual_seed(seed),
                                      mirror_axes=(0, 1))
        assert bool((seg[..., 1:] > seg[..., :-1]).all())                    # x (left-right) never flipped
        seen |= {axis for axis, d in ((0, seg[1:] - seg[:-1]), (1, seg[:, 1:] - seg[:, :-1])) if (d < 0).all()}
    assert seen == {0, 1}                                                     # z and y are


def test_train_records_the_mirror_axes_that_predict_then_uses(run_cli, kidney_prep, tmp_path):
    for args, axes in ((["--mirror-axes", "z,y"], [0, 1]), (["--no-augment"], [])):
        out = tmp_path / "-".join(args)
        code, _, err = run_cli("train", kidney_prep, "-o", out, "--preset", "small", "--epochs", "1",
                               "--batches-per-task", "1", "--fold", "all", "--device", "cpu", "-j", "0", "-q", *args)
        assert code == 0, err
        assert json.loads((out / "config.json").read_text())["mirror_axes"] == axes
        code, _, err = run_cli("predict", __import__("conftest").CT, "-m", out, "-t", "kidney_slabs", "-o",
                               tmp_path / "k.nii.gz", "--device", "cpu", "--step", "1")
        assert code == 0, err
        assert ("TTA on, 4 flips of z+y only" if axes else "TTA off: the model allows no mirroring") in err
    code, _, err = run_cli("train", kidney_prep, "-o", tmp_path / "bad", "--mirror-axes", "x,left")
    assert code == 2 and "--mirror-axes must be axes among z, y, x (comma-separated) or none, got 'x,left'" in err


# ---------------------------------------------------------------------------------------- loss
def test_loss_matches_a_hand_computation():
    from uniseg_cli.training.loss import DICE_SMOOTH, deep_supervision_weights, dice_ce_loss

    logits = torch.tensor([[[[[2.0, 0.0, -1.0]]], [[[0.0, 1.0, 0.5]]], [[[0.0, 0.0, 3.0]]], [[[9.0, 9.0, 9.0]]]]])
    target = torch.tensor([[[[0, 1, 2]]]])
    classes = 3                                                 # the fourth output is not the task's
    z = logits[0, :3, 0, 0].numpy()                             # (3 classes, 3 voxels)
    p = np.exp(z) / np.exp(z).sum(0)
    ce = -np.mean([np.log(p[t, v]) for v, t in enumerate([0, 1, 2])])
    onehot = np.eye(3)[[0, 1, 2]].T
    dice = [(2 * (p[c] * onehot[c]).sum() + DICE_SMOOTH) /
            (2 * (p[c] * onehot[c]).sum() + (p[c] * (1 - onehot[c])).sum() + ((1 - p[c]) * onehot[c]).sum() + DICE_SMOOTH)
            for c in (1, 2)]
    assert float(dice_ce_loss(logits, target, classes)) == pytest.approx(ce - np.mean(dice), rel=1e-5)
    assert deep_supervision_weights(5) == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15, 0])


# ------------------------------------------------------------------------------------ training
def test_short_training_on_real_data_lowers_the_loss(kidney_prep, tmp_path):
    from uniseg_cli.data.training_cache import read_plan
    from uniseg_cli.training.trainer import train, training_config

    config = training_config(read_plan(kidney_prep), "small")
    result = train(kidney_prep, tmp_path / "model", config=config,
                   options=TrainOptions(epochs=4, fold="all", augment=False, batches_per_task=5, batch_size=2,
                                        workers=0, device="cpu", progress=False))
    losses = [r["loss"] for r in result.log]
    assert losses[-1] < losses[0] - 0.05, losses
    assert (tmp_path / "model/model.safetensors").exists() and (tmp_path / "model/best/model.safetensors").exists()


def test_bf16_training_steps_train_and_are_logged(kidney_prep, tmp_path):
    """bf16 autocast (the CPU default where the CPU has native bf16) changes the arithmetic, not the recipe:
    the same batches give close losses and fp32 weights."""
    from safetensors.torch import load_file

    from uniseg_cli.data.training_cache import read_plan
    from uniseg_cli.training.trainer import train, training_config

    config = training_config(read_plan(kidney_prep), "small")
    runs = {p: train(kidney_prep, tmp_path / p, config=config,
                     options=TrainOptions(epochs=1, fold="all", precision=p, **FAST)) for p in ("fp32", "bf16")}
    assert [r["precision"] for r in runs["bf16"].log] == ["bf16"] and runs["fp32"].log[0]["precision"] == "fp32"
    assert runs["bf16"].log[0]["loss"] == pytest.approx(runs["fp32"].log[0]["loss"], abs=0.05)
    full, half = load_file(tmp_path / "fp32/model.safetensors"), load_file(tmp_path / "bf16/model.safetensors")
    assert all(t.dtype == torch.float32 for t in half.values())
    assert any(not torch.equal(full[k], half[k]) for k in full)              # autocast did take effect


def test_resume_after_interruption_gives_the_uninterrupted_weights(kidney_prep, tmp_path):
    from safetensors.torch import load_file

    from uniseg_cli.data.training_cache import read_plan
    from uniseg_cli.training.trainer import train, training_config

    config = training_config(read_plan(kidney_prep), "small")
    options = TrainOptions(epochs=3, fold="all", **FP32)
    train(kidney_prep, tmp_path / "straight", config=config, options=options)

    def kill_after_two(epoch: int) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(kidney_prep, tmp_path / "killed", config=config, options=options, on_epoch_end=kill_after_two)
    assert not (tmp_path / "killed/model.safetensors").exists()
    log_lines = (tmp_path / "killed/training_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log_lines] == [1, 2]
    result = train(kidney_prep, tmp_path / "killed", options=TrainOptions(epochs=3, fold="all", resume=True, **FP32))
    assert [r["epoch"] for r in result.log] == [1, 2, 3]
    straight, resumed = load_file(tmp_path / "straight/model.safetensors"), load_file(tmp_path / "killed/model.safetensors")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6)


def test_cli_train_validate_and_predict_with_the_result(run_cli, kidney_prep, tmp_path):
    from uniseg_cli.io.images import read_image

    out = tmp_path / "model"
    code, _, err = run_cli("train", kidney_prep, "-o", out, "--preset", "small", "--epochs", "2",
                           "--batches-per-task", "2", "--val-every", "1", "--device", "cpu", "-j", "1")
    assert code == 0, err
    records = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [r.get("epoch") for r in records[:2]] == [1, 2]
    assert set(records[0]["dice"]) == {"kidney_slabs"} and "kidney" in records[0]["dice"]["kidney_slabs"]
    assert records[-1]["event"] == "end"
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    splits = json.loads((out / "splits.json").read_text())["kidney_slabs"]
    assert len(splits) == 3 and sorted(sum((f["val"] for f in splits), [])) == ["ct0", "ct1", "ct2"]
    code, _, err = run_cli("train", kidney_prep, "-o", out, "--preset", "small", "--epochs", "2")
    assert code == 2 and "holds a training run; continue it with --resume" in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/notes.txt").write_text("mine")
    code, _, err = run_cli("train", kidney_prep, "-o", tmp_path / "busy", "--preset", "small")
    assert code == 2 and "busy: folder exists and is not empty" in err

    from conftest import CT
    code, _, err = run_cli("predict", CT, "--task", "kidney_slabs", "-m", out, "-o", tmp_path / "seg.nii.gz",
                           "--fast", "--device", "cpu", "-q")
    assert code == 0, err
    labels, geometry = read_image(tmp_path / "seg.nii.gz")
    assert geometry.same_grid(read_image(CT)[1]) and set(np.unique(labels)) <= {0, 1}


def test_ddp_two_gloo_processes_keep_identical_weights(kidney_prep, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: torchrun picks a free local port itself (no window between choosing and binding one)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "uniseg_cli", "train", str(kidney_prep), "-o", str(out),
               "--preset", "small", "--epochs", "2", "--batches-per-task", "4", "--fold", "all",
               "--device", "cpu", "-j", "0", "-q"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    end = json.loads((out / "training_log.jsonl").read_text().splitlines()[-1])
    first, second = end["weights_checksum_per_rank"]
    assert first == second
    assert Path(out / "model.safetensors").exists()


def test_split_file_folds_are_used_and_bad_ones_are_one_line(run_cli, kidney_prep, tmp_path):
    split = tmp_path / "splits_final.json"                # nnU-Net's form: a list of folds for one task
    split.write_text(json.dumps([{"train": ["ct0", "ct1"], "val": ["ct2"]}, {"train": ["ct2"], "val": ["ct0"]}]))
    out = tmp_path / "model"
    code, _, err = run_cli("train", kidney_prep, "-o", out, "--preset", "small", "--epochs", "1", "--batches-per-task",
                           "1", "--device", "cpu", "-j", "0", "--split-file", split, "--fold", "1", "-q")
    assert code == 0, err
    assert json.loads((out / "splits.json").read_text())["kidney_slabs"][1] == {"train": ["ct2"], "val": ["ct0"]}
    assert list(json.loads((out / "training_log.jsonl").read_text().splitlines()[0])["dice"]["kidney_slabs"]) == ["kidney"]

    code, _, err = run_cli("train", kidney_prep, "-o", tmp_path / "seven", "--preset", "small", "--device", "cpu",
                           "--split-file", split, "--fold", "7")
    assert code == 2 and err.strip() == "Error: --fold 7: task 'kidney_slabs' has 2 fold(s), numbered 0 to 1"
    split.write_text(json.dumps([{"train": ["ct0", "ct1"]}]))
    code, _, err = run_cli("train", kidney_prep, "-o", tmp_path / "noval", "--preset", "small", "--device", "cpu",
                           "--split-file", split)
    assert code == 2 and err.strip() == (f"Error: {split}: task 'kidney_slabs': every fold needs train and val lists "
                                         "of case names (val may be empty)")
    code, _, err = run_cli("train", kidney_prep, "-o", tmp_path / "default", "--preset", "small", "--device", "cpu",
                           "--fold", "5")                 # the 3 cases make 3 folds
    assert code == 2 and err.strip() == "Error: --fold 5: task 'kidney_slabs' has 3 fold(s), numbered 0 to 2"
