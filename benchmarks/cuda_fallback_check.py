"""On a CUDA machine: the CPU-accumulation fallback gives the same labels as accumulating on the GPU.

Runs the realistic-size CT (the real CT resampled to 0.8 × 0.8 × 1.5 mm) with TTA and `--precision auto`
once normally and once with the first sliding window failing as if the GPU were out of memory, and
prints both times and the fraction of voxels whose label agrees. Not a test (needs a GPU).

    python benchmarks/cuda_fallback_check.py
"""

from __future__ import annotations

import time

import numpy as np
import torch
from throughput import setup


def main() -> None:
    import uniseg_cli.inference.predictor as predictor
    from uniseg_cli.inference.predictor import Segmenter
    from uniseg_cli.inference.sliding_window import WindowOptions
    from uniseg_cli.io.images import read_image

    work, model_dir, scan = setup("uniseg-fallback-", large=True)
    data, geometry = read_image(scan)
    segmenter = Segmenter(model_dir, device="cuda", window=WindowOptions(mirror=True, precision="auto"))
    segmenter.predict_array(data, geometry.spacing, "kidney")  # warm-up
    start = time.perf_counter()
    normal = segmenter.predict_array(data, geometry.spacing, "kidney").labels
    normal_s = time.perf_counter() - start
    real = predictor.sliding_window
    failed = []

    def out_of_memory_once(*args, accumulate_on=None, **kwargs):
        if accumulate_on is None and not failed:
            failed.append(True)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, accumulate_on=accumulate_on, **kwargs)

    predictor.sliding_window = out_of_memory_once
    start = time.perf_counter()
    fallback = segmenter.predict_array(data, geometry.spacing, "kidney").labels
    fallback_s = time.perf_counter() - start
    agree = float(np.mean(normal == fallback))
    print(f"GPU accumulation {normal_s:.2f} s; after a simulated OOM, CPU accumulation {fallback_s:.2f} s "
          f"(includes the failed attempt); labels agree on {agree:.6f} of the voxels")


if __name__ == "__main__":
    main()
