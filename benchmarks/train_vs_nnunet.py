"""Training steps per second: uniseg's against nnU-Net v2's trainer, same patch, batch and CPU, one process (not a test).

Needs nnunetv2 in the environment (`pip install nnunetv2`). Both get the same batch (real CT patches
from tests/data at the kidney task's 3 mm slab spacing, cropped or padded to the patch, kidney labels),
the published optimiser (SGD, Nesterov momentum 0.99, weight decay 3e-5, lr 0.01), gradient norm
clipped at 12 and deep supervision; no augmentation on either side (nnU-Net v2 augments in loader
processes, uniseg on the device: this times the network step that both must run).

- nnU-Net v2: its own `nnUNetTrainer.train_step` on its own `PlainConvUNet` built with the published
  UniSeg configuration (features 32…320, the same kernels and strides), its `DC_and_CE_loss` with
  `MemoryEfficientSoftDiceLoss` behind its `DeepSupervisionWrapper`. On the CPU its step has no
  autocast (nnU-Net enables it on CUDA only): fp32.
- uniseg: `UniSeg` at the precision `uniseg train` would choose (`--precision auto`: bf16 channels-last
  on CPUs with bf16 matrix units, fp32 otherwise), its deep-supervision loss, the same optimiser.

Steps alternate between the two (one warm-up step each first), so that a shared machine's drift hits
both alike. Prints seconds per step (median) and the ratio.

    python benchmarks/train_vs_nnunet.py [--steps 3] [--batch 2] [--patch 64,192,192] [--precision auto]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

from uniseg_cli.inference.allocator import tune_allocator

tune_allocator()  # what `uniseg train` does in its process, before torch is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CT = ROOT / "tests" / "data" / "example_ct.nii.gz"
SEG = ROOT / "tests" / "data" / "example_seg_fast_force_split.nii.gz"


def batch(patch: tuple[int, ...], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` patches of the real CT (normalised as for the kidney task) and their kidney labels."""
    import nibabel as nib

    from uniseg_cli.data.preprocessing import preprocess
    from uniseg_cli.io.images import read_image
    from uniseg_cli.tasks import resolve_task

    task = resolve_task("kidney")
    data, geometry = read_image(CT)
    seg = np.isin(np.asarray(nib.load(SEG).dataobj).transpose(2, 1, 0), (2, 3)).astype(np.float32)[None]
    x, _ = preprocess(data, geometry.spacing, geometry.array_axis_world(), task.channels, (3.0, 3.0, 3.0))
    image = _fit(x.float(), patch)
    labels = _fit(torch.from_numpy(seg)[:, : x.shape[1], : x.shape[2], : x.shape[3]], patch).long()
    shift = [torch.roll(image, 8 * i, dims=3) for i in range(size)], [torch.roll(labels, 8 * i, dims=3) for i in range(size)]
    return torch.stack(shift[0]), torch.stack(shift[1])[:, 0]


def _fit(t: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    t = t[:, : patch[0], : patch[1], : patch[2]]
    pad = [p for s, n in zip(reversed(t.shape[1:]), reversed(patch)) for p in (0, n - s)]
    return torch.nn.functional.pad(t, pad)


def nnunet_step(patch: tuple[int, ...], classes: int, images: torch.Tensor, labels: torch.Tensor):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from uniseg_cli.config import UniSegConfig

    config = UniSegConfig(patch_size=patch)
    network = PlainConvUNet(
        1, config.num_stages, list(config.stage_features), torch.nn.Conv3d, [list(k) for k in config.conv_kernels],
        [[1, 1, 1]] + [list(p) for p in config.pool_kernels], config.convs_per_stage, classes,
        config.convs_per_stage, conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
        deep_supervision=True)
    levels = len(config.pool_kernels)
    weights = np.array([1 / (2 ** i) for i in range(levels)])
    weights[-1] = 0
    loss = DeepSupervisionWrapper(DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False},
                                                 {}, weight_ce=1, weight_dice=1, ignore_label=None,
                                                 dice_class=MemoryEfficientSoftDiceLoss), weights / weights.sum())
    optimizer = torch.optim.SGD(network.parameters(), 0.01, weight_decay=3e-5, momentum=0.99, nesterov=True)
    # nnU-Net's deep-supervision targets: the label map at each output's scale, finest first (nearest neighbour)
    shapes = [tuple(patch)]
    for pool in config.pool_kernels[:-1]:
        shapes.append(tuple(s // p for s, p in zip(shapes[-1], pool)))
    targets = [torch.nn.functional.interpolate(labels[:, None].float(), size=s, mode="nearest") for s in shapes]
    trainer = SimpleNamespace(device=torch.device("cpu"), network=network, loss=loss, optimizer=optimizer,
                              grad_scaler=None)
    return lambda: nnUNetTrainer.train_step(trainer, {"data": images, "target": targets})


def uniseg_step(patch: tuple[int, ...], precision: str, images: torch.Tensor, labels: torch.Tensor):
    from uniseg_cli.config import UniSegConfig
    from uniseg_cli.inference.runtime import AUTOCAST_DTYPES, channels_last, resolve_training_precision
    from uniseg_cli.model.network import UniSeg
    from uniseg_cli.tasks import resolve_task
    from uniseg_cli.training.loss import deep_supervision_loss

    device = torch.device("cpu")
    chosen = resolve_training_precision(precision, device)
    model = UniSeg(UniSegConfig(patch_size=patch)).train()
    model.set_channels_last(channels_last(chosen, device))
    optimizer = torch.optim.SGD(model.parameters(), 0.01, weight_decay=3e-5, momentum=0.99, nesterov=True)
    task = resolve_task("kidney")
    dtype = AUTOCAST_DTYPES.get(chosen)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss, _ = deep_supervision_loss(model(images, task.id), labels, task)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12)
        optimizer.step()

    return step, chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--patch", default="64,192,192")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args()
    patch = tuple(int(p) for p in args.patch.split(","))
    torch.manual_seed(0)
    images, labels = batch(patch, args.batch)
    ours, chosen = uniseg_step(patch, args.precision, images, labels)
    theirs = nnunet_step(patch, 3, images, labels)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; patch {patch}, batch {args.batch}; "
          f"uniseg {chosen}, nnU-Net v2 fp32")
    times: dict[str, list[float]] = {"uniseg": [], "nnunetv2": []}
    for i in range(args.steps + 1):
        for name, step in (("uniseg", ours), ("nnunetv2", theirs)):
            start = time.perf_counter()
            step()
            if i:  # the first step of each is a warm-up
                times[name].append(time.perf_counter() - start)
        print(f"  step {i}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items() if t and i), flush=True)
    ours_s, theirs_s = statistics.median(times["uniseg"]), statistics.median(times["nnunetv2"])
    print(f"uniseg {chosen}: {ours_s:.2f} s per step ({1 / ours_s:.3f} it/s); nnU-Net v2: {theirs_s:.2f} s per step "
          f"({1 / theirs_s:.3f} it/s); uniseg {theirs_s / ours_s:.2f}x nnU-Net v2's iterations per second")


if __name__ == "__main__":
    main()
