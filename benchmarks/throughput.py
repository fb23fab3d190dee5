"""Throughput of `uniseg predict` on one machine: precision, presets, batching, --task all (not a test).

Uses the published configuration with seeded random weights (the published weights are not available
here), the real CT from tests/data and, with --large, that CT resampled to 0.8 × 0.8 × 1.5 mm (made by
resampling, not a real scan). For each setting it runs the real predictor end to end (read,
pre-process, sliding window, export, write), reports seconds (and the sliding window's share), the
network's achieved FLOP/s (FLOPs of one forward counted by torch's FlopCounterMode), and Dice per
class of the label map against the fp32 reference with the same tiles.

    python benchmarks/throughput.py --device cpu            # CPU figures
    python benchmarks/throughput.py --device cuda --large   # GPU figures (realistic-size CT, TTA on)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from uniseg_cli.inference.allocator import tune_allocator

tune_allocator()  # what `uniseg predict` does in its process, before torch is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
from measures import dice, flops_per_forward  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CT = ROOT / "tests" / "data" / "example_ct.nii.gz"


def make_large_ct(path: Path) -> Path:
    """The real CT resampled (linear) to 0.8 × 0.8 × 1.5 mm with nibabel and scipy, affine scaled to match."""
    import nibabel as nib
    from scipy import ndimage

    image = nib.load(CT)
    zooms = np.array(image.header.get_zooms()[:3])
    target = np.array([0.8, 0.8, 1.5])
    data = np.asarray(image.dataobj, dtype=np.float32)
    big = ndimage.zoom(data, zooms / target, order=1, mode="nearest", grid_mode=True).round().astype(np.int16)
    affine = image.affine.copy()
    affine[:3, :3] = affine[:3, :3] / zooms * target
    nib.save(nib.Nifti1Image(big, affine), path)
    return path


def setup(prefix: str, *, large: bool) -> tuple[Path, Path, Path]:
    """A seeded published-size model folder and the input scan in a fresh work folder.

    Returns (work folder, model folder, scan)."""
    from uniseg_cli import save_model
    from uniseg_cli.config import UniSegConfig
    from uniseg_cli.model.network import UniSeg

    work = Path(tempfile.mkdtemp(prefix=prefix))
    torch.manual_seed(0)
    model_dir = save_model(UniSeg(UniSegConfig()), work / "model")
    return work, model_dir, make_large_ct(work / "large_ct.nii.gz") if large else CT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--large", action="store_true", help="use the CT resampled to 0.8 × 0.8 × 1.5 mm")
    parser.add_argument("--settings", default="fp32,bf16,fast,batch2,all",
                        help="comma-separated: fp32, bf16, fp16, fast, fast-fp32, batch2, batch4, all, tta (fp32 + TTA), "
                             "tta-bf16, tta-fp16")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import nibabel as nib

    from uniseg_cli.config import UniSegConfig
    from uniseg_cli.inference import sliding_window as sw_module
    from uniseg_cli.inference.cases import Case
    from uniseg_cli.inference.predictor import Segmenter
    from uniseg_cli.inference.sliding_window import WindowOptions
    from uniseg_cli.model.network import UniSeg

    work, model_dir, scan = setup("uniseg-throughput-", large=args.large)
    flops = flops_per_forward(UniSegConfig())
    shape = nib.load(scan).shape
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} CPU threads; input {scan.name} "
          f"{'x'.join(map(str, shape))}{' (made by resampling the real CT)' if args.large else ''}; "
          f"one forward = {flops / 1e12:.3f} TFLOP")

    window_seconds = []
    original = sw_module.sliding_window

    def timed_window(*a, **k):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = original(*a, **k)
        if out and out[0].is_cuda:
            torch.cuda.synchronize()
        window_seconds.append(time.perf_counter() - start)
        return out

    import uniseg_cli.inference.predictor as predictor_module
    predictor_module.sliding_window = timed_window
    forwards = [0]
    encode = UniSeg.encode

    def counted_encode(self, x):
        forwards[0] += x.shape[0]
        return encode(self, x)

    UniSeg.encode = counted_encode

    presets = {
        "fp32": ("kidney", WindowOptions(mirror=False, precision="fp32")),
        "auto": ("kidney", WindowOptions(mirror=False)),
        "bf16": ("kidney", WindowOptions(mirror=False, precision="bf16")),
        "fp16": ("kidney", WindowOptions(mirror=False, precision="fp16")),
        "fast": ("kidney", WindowOptions(mirror=False, step=0.75, precision="fast")),  # the --fast preset
        "fast-fp32": ("kidney", WindowOptions(mirror=False, step=0.75, precision="fp32")),
        "batch2": ("kidney", WindowOptions(mirror=False, batch_size=2, precision="fp32")),
        "batch4": ("kidney", WindowOptions(mirror=False, batch_size=4, precision="fp32")),
        "all": ("all", WindowOptions(mirror=False, precision="fp32")),
        "tta": ("kidney", WindowOptions(mirror=True, precision="fp32")),
        "tta-bf16": ("kidney", WindowOptions(mirror=True, precision="bf16")),
        "tta-fp16": ("kidney", WindowOptions(mirror=True, precision="fp16")),
    }
    results, labels = {}, {}
    case = Case("ct", (scan,))
    for name in args.settings.split(","):
        task, window = presets[name]
        segmenter = Segmenter(model_dir, device=args.device, window=window)
        if args.device.startswith("cuda") and not results:  # one untimed warm-up (cuDNN autotuning, allocator)
            segmenter.predict_case(case, task, work / "warmup.nii.gz")
        window_seconds.clear()
        forwards[0] = 0
        start = time.perf_counter()
        segmenter.predict_case(case, task, work / f"{name}.nii.gz")
        total = time.perf_counter() - start
        labels[name] = np.asarray(nib.load(work / f"{name}.nii.gz").dataobj)
        rate = forwards[0] * flops / sum(window_seconds) / 1e12
        results[name] = {"seconds": round(total, 2), "window_seconds": round(sum(window_seconds), 2),
                         "forwards": forwards[0], "network_tflops": None if task == "all" else round(rate, 3)}
        print(f"{name:9s} total {total:7.2f} s   sliding window {sum(window_seconds):7.2f} s   {forwards[0]:3d} passes"
              + ("" if task == "all" else f"   {rate:.3f} TFLOP/s in the network"), flush=True)
    for name in labels:
        reference = "tta" if name.startswith("tta") else "fp32"   # same tiles and mirroring, fp32
        if name in (reference, "all") or reference not in labels:
            continue
        d = [dice(labels[name], labels[reference], v) for v in (1, 2)]
        results[name]["dice_vs_" + reference] = [round(v, 4) for v in d]
        print(f"{name:9s} Dice vs {reference}: kidney {d[0]:.4f}, tumour {d[1]:.4f}")
    results["flops_per_forward"] = flops
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
