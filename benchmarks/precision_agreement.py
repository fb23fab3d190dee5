"""How far reduced precision (`--precision fast`: bf16 channels-last on CPUs with bf16 matrix units) moves label maps from fp32 (not a test).

For every case and task it runs the predictor twice with the same tiles and mirroring, in fp32 (the
published computation) and at `--against` (default `fast`; `bf16-checked` recomputes near ties in fp32),
and prints the seconds of `predict_array` (pre-processing, sliding window, export; not reading), the
Dice per class of that map against the fp32 one, and the share of the scan's voxels whose label differs.

Random weights make every class probability a near-tie, so agreement measured with them is a
pessimistic bound (`--model random-published`: the published configuration, seeded); what users get is
measured with trained models:

    python benchmarks/precision_agreement.py                           # uniseg-demo on the real scans
    python benchmarks/precision_agreement.py --model brats-ft -t brats_r \\
        --case pat0003=imagesTs/brats_2013_pat0003_1_0000.nii.gz,imagesTs/brats_2013_pat0003_1_0001.nii.gz
    python benchmarks/precision_agreement.py --model WORK/model        # tools/build_demo_model.py --preset published
    python benchmarks/precision_agreement.py --model random-published -t kidney

Default cases (the demo model's): the CT and the DICOM CT series in tests/data with the CT tasks and,
where ../shared/data is present, the two TCGA glioma cases with brain_tumor. `--tta` mirrors as
published (slow with large models on a CPU; default off, which changes nothing in the comparison).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from uniseg_cli.inference.allocator import tune_allocator

tune_allocator()  # what `uniseg predict` does in its process, before torch is imported

import numpy as np  # noqa: E402
from measures import dice  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
BRAIN = ROOT.parent / "shared" / "data" / "brain_tcga_4ch"
SEQUENCES = ("t1", "t1c", "t2", "fla")
CT_TASKS = ("kidney", "liver", "spleen")


def default_cases() -> list[tuple[str, list[Path], tuple[str, ...]]]:
    """(name, channel files, tasks) of the real scans the demo model has tasks for."""
    found = [("example CT", [DATA / "example_ct.nii.gz"], CT_TASKS),
             ("DICOM CT series", [DATA / "example_ct_dicom"], CT_TASKS)]
    # (case, folder): TCGA-FG-6692 lies under the name its source gave it
    for case, stem in (("TCGA-DU-7294", "TCGA-DU-7294"), ("TCGA-FG-6692", "OtherEXampleFromTCIA")):
        folder = BRAIN / stem / f"{stem}_brainles" / "raw_bet"
        if folder.is_dir():
            found.append((f"{case} MR", [folder / f"{stem}_{s}_bet.nii.gz" for s in SEQUENCES], ("brain_tumor",)))
    return found


def model_spec(name: str, work: Path) -> str:
    if name != "random-published":
        return name
    import torch

    from uniseg_cli import save_model
    from uniseg_cli.config import UniSegConfig
    from uniseg_cli.model.network import UniSeg

    torch.manual_seed(0)
    return str(save_model(UniSeg(UniSegConfig()), work / "random-published"))


class RedoneTiles(logging.Handler):
    """Counts the tiles ``bf16-checked`` recomputed in fp32, from the sliding window's debug line."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.redone = self.tiles = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "near tie" in record.msg:
            self.redone += record.args[0]
            self.tiles += record.args[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="uniseg-demo")
    parser.add_argument("-t", "--task", help="task(s) for --case inputs, comma-separated")
    parser.add_argument("--case", action="append", default=[], metavar="NAME=FILE[,FILE…]")
    parser.add_argument("--against", default="fast",
                        help="the precision compared with fp32: fast (default: bf16 on CPUs with bf16 units), bf16, "
                             "bf16-checked, fp16")
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from uniseg_cli.inference.predictor import Segmenter
    from uniseg_cli.inference.runtime import choose_precision
    from uniseg_cli.inference.sliding_window import WindowOptions
    from uniseg_cli.io.images import read_channels
    from uniseg_cli.tasks import resolve_task

    cases = [(n, [Path(f) for f in files.split(",")], tuple(args.task.split(",")))
             for n, files in (c.split("=", 1) for c in args.case)] if args.case else default_cases()
    if args.case and not args.task:
        parser.error("--case needs --task")
    with tempfile.TemporaryDirectory() as tmp:
        spec = model_spec(args.model, Path(tmp))
        segmenters = {p: Segmenter(spec, device=args.device, window=WindowOptions(mirror=args.tta, precision=p))
                      for p in ("fp32", args.against)}
    choice = choose_precision(args.against, torch.device(args.device))
    print(f"model {args.model} on {args.device}; TTA {'on' if args.tta else 'off'}, step 0.5; "
          f"{args.against} = {choice.precision} ({choice.why})")
    counter = RedoneTiles()
    window_log = logging.getLogger("uniseg_cli.inference.sliding_window")
    window_log.setLevel(logging.DEBUG)
    window_log.addHandler(counter)
    checked = choice.near_tie > 0
    print("| case, task | fp32 | " + args.against + " | Dice per class | voxels differing |" +
          (" tiles again in fp32 |" if checked else ""))
    print("|---|---|---|---|---|" + ("---|" if checked else ""))
    for case, paths, tasks in cases:
        data, geometry = read_channels(paths)
        for task in tasks:
            labels, seconds = {}, {}
            for name, segmenter in segmenters.items():
                counter.redone = counter.tiles = 0
                start = time.perf_counter()
                labels[name] = segmenter.predict_array(data, geometry.spacing, task,
                                                       axis_world=geometry.array_axis_world()).labels
                seconds[name] = time.perf_counter() - start
            classes = resolve_task(task, segmenters["fp32"].tasks).labels
            reference, other = labels["fp32"], labels[args.against]
            scores = " / ".join(f"{dice(other, reference, v):.4f}" for v in range(1, len(classes) + 1))
            differing = np.count_nonzero(other != reference) / reference.size
            print(f"| {case}, {task} | {seconds['fp32']:.1f} s | {seconds[args.against]:.1f} s | {scores} | "
                  f"{100 * differing:.4f}% |" + (f" {counter.redone} of {counter.tiles} |" if checked else ""),
                  flush=True)


if __name__ == "__main__":
    main()
