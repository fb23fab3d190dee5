"""How far reduced precision and the --fast preset move label maps away from the faithful default (not a test).

Random weights make every class probability a near-tie, so agreement measured with them is pessimistic;
this benchmark uses a trained model (default: the bundled `uniseg-demo`) on the real scans: the CT in
tests/data and, where ../shared/data is present, its DICOM CT (held out from the demo model's training)
and two TCGA glioma cases (one held out). For every case and task it runs the predictor with the default
settings (fp32, 8-way mirroring, step 0.5) and with each other setting, and prints the seconds of
`predict_array` (pre-processing, sliding window, export; not reading) and the Dice per class against the
default.

    python benchmarks/fast_agreement.py [--model uniseg-demo] [--settings bf16,fast-fp32,fast] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from uniseg_cli.inference.allocator import tune_allocator

tune_allocator()  # what `uniseg predict` does in its process, before torch is imported

from measures import dice  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
BRAIN = SHARED / "brain_tcga_4ch"
SEQUENCES = ("t1", "t1c", "t2", "fla")
CT_TASKS = ("kidney", "liver", "spleen")

#: name → (mirroring, step, precision)
SETTINGS = {
    "default": (True, 0.5, "fp32"),
    "bf16": (True, 0.5, "bf16"),
    "fast-fp32": (False, 0.75, "fp32"),
    "fast": (False, 0.75, "fast"),
}


def cases() -> list[tuple[str, list[Path], tuple[str, ...]]]:
    """(name, channel files, tasks) of every real scan on this machine."""
    found = [("example_ct (trained on)", [ROOT / "tests" / "data" / "example_ct.nii.gz"], CT_TASKS)]
    if (SHARED / "ct_abdomen_totalseg" / "example_ct_dicom").is_dir():
        found.append(("DICOM CT (held out)", [SHARED / "ct_abdomen_totalseg" / "example_ct_dicom"], CT_TASKS))
    for case, note in (("TCGA-DU-7294", "trained on"), ("OtherEXampleFromTCIA", "held out")):
        folder = BRAIN / case / f"{case}_brainles" / "raw_bet"
        if folder.is_dir():
            found.append((f"{case} MR ({note})", [folder / f"{case}_{s}_bet.nii.gz" for s in SEQUENCES],
                          ("brain_tumor",)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="uniseg-demo")
    parser.add_argument("--settings", default="bf16,fast-fp32,fast", help=f"any of {', '.join(SETTINGS)}")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from uniseg_cli.inference.predictor import Segmenter
    from uniseg_cli.inference.sliding_window import WindowOptions
    from uniseg_cli.io.images import read_channels
    from uniseg_cli.tasks import resolve_task

    names = ["default", *[s for s in args.settings.split(",") if s != "default"]]
    segmenters = {}
    for name in names:
        mirror, step, precision = SETTINGS[name]
        segmenters[name] = Segmenter(args.model, device=args.device,
                                     window=WindowOptions(step=step, mirror=mirror, precision=precision))
    print(f"model {args.model} on {args.device}; " + "; ".join(
        f"{n}: TTA {'on' if s.window.mirror else 'off'}, step {s.window.step}, {s.window.precision}"
        for n, s in segmenters.items()))
    for case, paths, tasks in cases():
        data, geometry = read_channels(paths)
        for task in tasks:
            labels, seconds = {}, {}
            for name, segmenter in segmenters.items():
                start = time.perf_counter()
                labels[name] = segmenter.predict_array(data, geometry.spacing, task,
                                                       axis_world=geometry.array_axis_world()).labels
                seconds[name] = time.perf_counter() - start
            values = range(1, len(resolve_task(task, segmenters["default"].tasks).labels) + 1)
            reference = labels["default"]
            row = [f"{case}, {task}: default {seconds['default']:.1f} s"]
            for name in names[1:]:
                scores = " / ".join(f"{dice(labels[name], reference, v):.4f}" for v in values)
                row.append(f"{name} {seconds[name]:.1f} s, Dice {scores}")
            print("  " + "; ".join(row), flush=True)


if __name__ == "__main__":
    main()
