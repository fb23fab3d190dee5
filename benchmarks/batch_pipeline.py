"""How much the batch pipeline (prefetch + background writes) saves over one case after another (not a test).

Writes N copies of a CT, then in one process (after a warm-up) segments them once with a plain loop of
`Segmenter.predict_case` and once with the batch runner that `uniseg predict` uses, and prints both times.

    python benchmarks/batch_pipeline.py --device cuda --large --cases 4
"""

from __future__ import annotations

import argparse
import shutil
import time

from throughput import setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--large", action="store_true")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--tta", action="store_true")
    args = parser.parse_args()

    from uniseg_cli.inference.batch import run_batch
    from uniseg_cli.inference.cases import Case
    from uniseg_cli.inference.predictor import Segmenter
    from uniseg_cli.inference.sliding_window import WindowOptions

    work, model_dir, source = setup("uniseg-batch-", large=args.large)
    scans = []
    for i in range(args.cases):
        scans.append(work / "in" / f"case{i}.nii.gz")
        scans[-1].parent.mkdir(exist_ok=True)
        shutil.copy(source, scans[-1])
    window = WindowOptions(mirror=args.tta, precision="auto")
    segmenter = Segmenter(model_dir, device=args.device, window=window)
    segmenter.predict_case(Case("warmup", (scans[0],)), "kidney", work / "warmup.nii.gz")
    start = time.perf_counter()
    for scan in scans:
        segmenter.predict_case(Case(scan.stem, (scan,)), "kidney", work / "loop" / f"{scan.name}")
    loop = time.perf_counter() - start
    start = time.perf_counter()
    failures = run_batch([str(s) for s in scans], (), task="kidney", model=str(model_dir), output=work / "batch",
                         device=args.device, window=window, probabilities=None, modality=None, shard=None,
                         skip_existing=False, emit=None, progress=False)
    batch = time.perf_counter() - start  # includes loading the model once more
    print(f"{args.cases} cases of {source.name}, TTA {'on' if args.tta else 'off'}, {args.device}: one after another "
          f"{loop:.2f} s ({loop / args.cases:.2f} s/case); batch pipeline {batch:.2f} s ({batch / args.cases:.2f} s/case, "
          f"model load included); failures {failures}")


if __name__ == "__main__":
    main()
