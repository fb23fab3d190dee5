"""Training iterations per second of `uniseg train` (not a test).

Builds an nnU-Net v2 dataset from the real CT in tests/data (three axial slabs, both kidneys as one
label, as the tests do), pre-processes it with `uniseg preprocess` at the CT's own 3 mm spacing, and
times `uniseg train` for one epoch after a warm-up epoch: batches of 2 patches with the full
augmentation, one task per batch, the published optimiser, `--precision` as given (auto: fp16 on CUDA,
bf16 on CPUs with native bf16). Reports iterations (batches)
per second and patches per second from the training log.

    python benchmarks/train_throughput.py --preset small --device cpu        # the CPU smoke preset
    python benchmarks/train_throughput.py --preset small --device cpu --precision fp32
    python benchmarks/train_throughput.py --preset published --device cuda   # patch 64x192x192, batch 2, AMP
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import write_kidney_dataset  # noqa: E402  (the tests' dataset builder, one copy)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small", choices=["small", "published"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, default=40, help="batches per timed epoch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dataset = write_kidney_dataset(work / "Dataset001_KidneySlabs")
        uniseg = [sys.executable, "-m", "uniseg_cli"]
        subprocess.run([*uniseg, "preprocess", "-d", f"kidney_slabs={dataset}", "-o", str(work / "prep"), "-q"], check=True)
        subprocess.run([*uniseg, "train", str(work / "prep"), "-o", str(work / "model"), "--preset", args.preset,
                        "--epochs", "2", "--batches-per-task", str(args.batches), "--fold", "all",
                        "--device", args.device, "-j", str(args.workers), "--precision", args.precision, "-q"], check=True)
        records = [json.loads(line) for line in (work / "model/training_log.jsonl").read_text().splitlines()]
        timed = records[1]  # the second epoch: no start-up cost
        result = {"preset": args.preset, "device": args.device, "precision": timed["precision"],
                  "workers": args.workers, "batch_size": 2,
                  "batches": args.batches, "seconds": timed["seconds"],
                  "iterations_per_second": round(args.batches / timed["seconds"], 3),
                  "patches_per_second": round(2 * args.batches / timed["seconds"], 3)}
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
