"""uniseg's sliding window + export against nnU-Net v2's predictor, same weights and input (not a test).

Needs nnunetv2 in the environment (`pip install nnunetv2`). Both tools get the same network (the
published configuration, seeded random weights, or `--model DIR`; for nnU-Net v2 computed as published,
with the decoder's concatenations, and with torch's default kernels), the same pre-processed input
(uniseg's pre-processing of the real CT at the kidney task's spacing) and the same settings (step
0.5, Gaussian weighting, mirroring on or off). Each run happens in a fresh process so that its peak
RSS is its own. Printed: seconds of sliding window and of export (resampling back + argmax), peak RSS,
the wall-time ratio, and the Dice per class of the two label maps.

nnU-Net v2 accumulates logits (float16) and averages logits over mirrors; uniseg follows the published
UniSeg (nnU-Net v1) pipeline and averages softmax probabilities in float32, so the maps can differ
slightly; the Dice says by how much.

    python benchmarks/predict_vs_nnunet.py [--model DIR] [--cases small,tile-tta,large,huge] [--precision fp32,bf16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

if "--run-one" in sys.argv and sys.argv[sys.argv.index("--run-one") + 1] == "uniseg":
    from uniseg_cli.inference.allocator import tune_allocator

    tune_allocator()  # what `uniseg predict` does in its process, before torch is imported

import numpy as np
import torch
from measures import dice

ROOT = Path(__file__).resolve().parents[1]
CT = ROOT / "tests" / "data" / "example_ct.nii.gz"
TASK = "kidney"


def prepare(work: Path, model_dir: Path | None, cases: list[str]) -> tuple[Path, list[dict]]:
    """Model folder and pre-processed inputs for every benchmark case, written once."""
    import SimpleITK as sitk

    from uniseg_cli import save_model
    from uniseg_cli.config import UniSegConfig
    from uniseg_cli.data.preprocessing import preprocess
    from uniseg_cli.io.images import read_image
    from uniseg_cli.model.network import UniSeg
    from uniseg_cli.tasks import resolve_task

    if model_dir is None:
        torch.manual_seed(0)
        model_dir = save_model(UniSeg(UniSegConfig()), work / "model", overwrite=True)
    task = resolve_task(TASK)
    runs = []
    for name in cases:
        source = CT
        if name in ("large", "huge"):
            image = sitk.ReadImage(str(CT))
            if name == "large":
                spacing = (0.8, 0.8, 1.5)
                size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
            else:  # 512 × 512 × 600 voxels over the same field of view
                size = [512, 512, 600]
                spacing = tuple(n * s / t for n, s, t in zip(image.GetSize(), image.GetSpacing(), size))
            big = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                                image.GetDirection(), -1024, sitk.sitkInt16)
            source = work / f"{name}_ct.nii.gz"
            sitk.WriteImage(big, str(source))
        data, geometry = read_image(source)
        x, info = preprocess(data, geometry.spacing, geometry.array_axis_world(), task.channels, task.target_spacing)
        x = x.numpy()
        if name == "tile-tta":  # one patch-sized crop, so 8-way mirroring stays affordable on a CPU
            x = np.ascontiguousarray(x[:, :64, :192, :192])
        np.save(work / f"{name}.npy", x)
        runs.append({"name": name, "input": str(work / f"{name}.npy"), "tta": name == "tile-tta",
                     "source_shape": list(geometry.shape), "source_spacing": list(geometry.spacing),
                     "cropped_shape": list(info.cropped_shape) if name != "tile-tta" else list(x.shape[1:]),
                     "spacing": list(info.spacing) if name != "tile-tta" else list(task.target_spacing),
                     "target": list(task.target_spacing)})
    return model_dir, runs


def run_one(tool: str, model_dir: str, run: dict, out: str) -> None:
    """One tool on one input, in this (fresh) process; writes labels and timings."""
    from uniseg_cli import load_model
    from uniseg_cli.data.preprocessing import CropInfo, labels_from_probabilities
    from uniseg_cli.inference.sliding_window import WindowOptions, sliding_window
    from uniseg_cli.tasks import resolve_task

    task = resolve_task(TASK)
    model = load_model(model_dir, device="cpu")
    x = torch.from_numpy(np.load(run["input"]))
    shape = tuple(run["cropped_shape"])
    info = CropInfo((0, 1, 2), shape, tuple(slice(0, s) for s in shape), tuple(run["spacing"]), tuple(run["target"]))
    start = time.perf_counter()
    if tool == "uniseg":
        with torch.inference_mode():
            options = WindowOptions(mirror=run["tta"], precision=run["precision"])
            probs = sliding_window(model, x, [task.label_manager.head], options)[0]
            window = time.perf_counter() - start
            labels = labels_from_probabilities(probs, info)[0].numpy()
    else:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        from uniseg_cli.model.blocks import ConvBlock

        # nnU-Net v2 gets the network as published (and as nnU-Net builds its decoders): each decoder
        # stage convolves the concatenation of upsampled and skip features; uniseg splits that convolution.
        ConvBlock.forward_concatenated = lambda self, a, b: self.forward(torch.cat([a, b], dim=1))
        from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

        class TaskBound(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, patch: torch.Tensor) -> torch.Tensor:
                return self.model(patch, task.id)

        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=run["tta"],
                                    perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
        predictor.network = TaskBound()
        predictor.configuration_manager = SimpleNamespace(patch_size=list(model.config.patch_size))
        predictor.label_manager = SimpleNamespace(num_segmentation_heads=model.config.num_classes)
        predictor.allowed_mirroring_axes = (0, 1, 2)
        logits = predictor.predict_sliding_window_return_logits(x)
        window = time.perf_counter() - start
        logits = logits[: task.num_classes].float().numpy()
        if tuple(logits.shape[1:]) != shape:
            logits = resample_data_or_seg_to_shape(logits, shape, run["target"], run["spacing"], is_seg=False,
                                                   order=1, order_z=0, force_separate_z=None)
        labels = np.asarray(logits).argmax(0).astype(np.uint8)
    total = time.perf_counter() - start
    np.save(out + ".npy", labels)
    Path(out + ".json").write_text(json.dumps({
        "window_s": window, "export_s": total - window, "total_s": total,
        "peak_rss_mib": peak_rss_mib(),
    }))


def peak_rss_mib() -> float:
    """This process's own peak RSS: VmHWM, which exec resets (getrusage's ru_maxrss keeps the peak of the
    parent that forked it, here the one that prepared the large inputs)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--cases", default="small,tile-tta,large", help="any of small, tile-tta, large, huge")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--precision", default="fp32",
                        help="uniseg's precision(s), comma-separated (nnU-Net v2 runs fp32 on the CPU)")
    parser.add_argument("--run-one", nargs=4, metavar=("TOOL", "MODEL", "RUN_JSON", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        tool, model_dir, run_json, out = args.run_one
        run_one(tool, model_dir, json.loads(run_json), out)
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="uniseg-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, runs = prepare(work, args.model, args.cases.split(","))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {model_dir}; task {TASK}; step 0.5")
    for run in runs:
        results = {}
        for tool, precision in [("uniseg", p) for p in args.precision.split(",")] + [("nnunetv2", "fp32")]:
            label = tool if tool == "nnunetv2" else f"uniseg {precision}"
            out = str(work / f"{run['name']}-{label.replace(' ', '-')}")
            subprocess.run([sys.executable, __file__, "--run-one", tool, str(model_dir),
                            json.dumps(run | {"precision": precision}), out], check=True)
            results[label] = json.loads(Path(out + ".json").read_text()) | {"labels": np.load(out + ".npy")}
        theirs = results["nnunetv2"]
        grid = "×".join(map(str, run["source_shape"][::-1]))
        what = {"small": f"real CT {grid} @ 3 mm",
                "tile-tta": "one 64×192×192 tile of the real CT, 8-way mirroring",
                "large": f"real CT resampled to 0.8×0.8×1.5 mm ({grid}; made by resampling, not a real scan)",
                "huge": f"real CT resampled to {grid} voxels (made by resampling, not a real scan)"}
        print(f"\n{run['name']}: {what[run['name']]}, TTA {'on' if run['tta'] else 'off'}")
        for tool, r in results.items():
            print(f"  {tool:12s} window {r['window_s']:7.1f} s  export {r['export_s']:6.1f} s  total {r['total_s']:7.1f} s"
                  f"  peak RSS {r['peak_rss_mib']:6.0f} MiB")
        for tool, ours in results.items():
            if tool == "nnunetv2":
                continue
            print(f"  {tool}: wall time {ours['total_s'] / theirs['total_s']:.2f}x nnU-Net v2's, peak RSS "
                  f"{ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}x; Dice per class against nnU-Net v2: "
                  + ", ".join(f"{v}: {dice(ours['labels'], theirs['labels'], v):.4f}" for v in (1, 2)))


if __name__ == "__main__":
    main()
