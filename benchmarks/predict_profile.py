"""Where a whole `uniseg predict` spends its time, phase by phase (not a test).

Runs the command in this process, after the allocator tuning the console script does, with a wall-clock
timer around each phase (loading the model, reading, the input checks and pre-processing, the sliding
window, the export back to the scan's grid, writing; reading and writing run in their own threads, so
the timers wrap the functions, whatever thread calls them), and cProfile on the main thread for the
functions with the most time of their own outside torch's operators: a part of the pipeline that
grows into the bottleneck once the network is fast shows here first.

    python benchmarks/predict_profile.py [-m MODEL|random-published] [--input SCAN] [-t TASK] [-- OPTIONS]

Default: the published configuration with seeded random weights (`random-published`), the real CT of
tests/data, task kidney, `--no-tta`, at the precision `predict` picks on this CPU.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from uniseg_cli.inference.allocator import tune_allocator

tune_allocator()  # what the console script does before torch is imported

ROOT = Path(__file__).resolve().parents[1]
CT = ROOT / "tests" / "data" / "example_ct.nii.gz"
SECONDS: dict[str, float] = defaultdict(float)


def timed(owner: object, name: str, phase: str) -> None:
    """Replace ``owner.name`` by a wrapper that adds its wall time to ``SECONDS[phase]``."""
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            SECONDS[phase] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="random-published")
    parser.add_argument("--input", type=Path, default=CT)
    parser.add_argument("-t", "--task", default="kidney")
    parser.add_argument("extra", nargs="*", help="further predict options, after --")
    args = parser.parse_args()

    import torch

    from uniseg_cli.cli import main as cli
    from uniseg_cli.inference import predictor

    phases = [(predictor.Segmenter, "__init__", "load the model"),
              (predictor, "read_channels", "read the scan"),
              (predictor.Segmenter, "prepare_array", "input checks + pre-processing"),
              (predictor.Segmenter, "_preprocess", "  of which pre-processing (crop, normalise, resample)"),
              (predictor.Segmenter, "_window", "sliding window (the network)"),
              (predictor, "labels_from_probabilities", "export (resample back, argmax)"),
              (predictor.Segmenter, "export", "write the outputs")]
    for owner, name, phase in phases:
        timed(owner, name, phase)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model == "random-published":
            from uniseg_cli import save_model
            from uniseg_cli.config import UniSegConfig
            from uniseg_cli.model.network import UniSeg

            torch.manual_seed(0)
            model = str(save_model(UniSeg(UniSegConfig()), Path(tmp) / "random-published"))
        argv = ["predict", str(args.input), "--task", args.task, "-m", model, "--no-tta", "--device", "cpu",
                "-o", str(Path(tmp) / "out.nii.gz"), "-q", *args.extra]
        profile = cProfile.Profile()
        began = time.perf_counter()
        code = profile.runcall(cli, argv)
        wall = time.perf_counter() - began
    if code:
        sys.exit(f"uniseg predict exited {code}")
    print(f"uniseg predict {args.input.name} --task {args.task} -m {args.model} --no-tta {' '.join(args.extra)}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"  {wall:6.2f} s  100.0%  the whole command")
    for _, _, phase in phases:
        print(f"  {SECONDS[phase]:6.2f} s  {100 * SECONDS[phase] / wall:5.1f}%  {phase}")
    print("most time of their own on the main thread, outside torch's operators:")
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    own = sorted(((tt, f"{Path(f).name}:{line}({n})") for (f, line, n), (_, _, tt, _, _) in stats.items()
                  if "torch" not in f and "torch" not in n and n != "wrapper"), reverse=True)
    for tt, where in own[:12]:
        print(f"  {tt:6.2f} s  {where}")


if __name__ == "__main__":
    main()
