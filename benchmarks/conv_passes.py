"""What a training step's convolutions can gain from bf16 on this CPU (not a test).

A training step is a forward convolution, a data gradient and a weight gradient per layer; bf16 can speed
a step up at most as much as it speeds those three up, so this sets the ceiling of `uniseg train`'s bf16
steps against fp32 ones (nnU-Net v2's CPU steps are fp32, contiguous). For the published network's
3×3×3 convolutions at a 32×96×96 patch (batch 2: 32, 64, 128 and 256 channels at their stages' sizes),
each part is timed through oneDNN (`aten::mkldnn_convolution`, `aten::convolution_backward`) in
bf16 channels-last (what `train` runs on CPUs with bf16 matrix units) and fp32 contiguous (nnU-Net v2's),
best of `--repeats` after one warm-up, and printed in TFLOP/s with the bf16/fp32 ratio.

    python benchmarks/conv_passes.py [--repeats 5] [--batch 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

# (channels, Z, Y, X) of the published network's stages at a 32×96×96 patch
STAGES = ((32, 32, 96, 96), (64, 32, 48, 48), (128, 16, 24, 24), (256, 8, 12, 12))
LAYOUTS = {"bf16 channels-last": (torch.bfloat16, torch.channels_last_3d),
           "fp32 contiguous": (torch.float32, torch.contiguous_format)}


def best_seconds(work: Callable[[], object], repeats: int) -> float:
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    one = [1, 1, 1]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"TFLOP/s of 3x3x3 convolutions, batch {args.batch}")
    print(f"{'channels, size':<22}{'layout':<20}{'forward':>9}{'data grad':>11}{'weight grad':>13}{'all three':>11}")
    for channels, *size in STAGES:
        flop = 2 * args.batch * channels * channels * 27 * size[0] * size[1] * size[2]
        rates: dict[str, list[float]] = {}
        for name, (dtype, layout) in LAYOUTS.items():
            x = torch.randn(args.batch, channels, *size).to(dtype).contiguous(memory_format=layout)
            w = torch.randn(channels, channels, 3, 3, 3).to(dtype).contiguous(memory_format=layout)
            g = torch.randn_like(x)

            def backward(mask: list[bool]) -> Callable[[], object]:
                return lambda: torch.ops.aten.convolution_backward(g, x, w, [channels], one, one, one, False,
                                                                   [0, 0, 0], 1, mask)

            def forward() -> torch.Tensor:
                return torch.ops.aten.mkldnn_convolution(x, w, None, one, one, one, 1)

            seconds = [best_seconds(forward, args.repeats),
                       best_seconds(backward([True, False, False]), args.repeats),
                       best_seconds(backward([False, True, True]), args.repeats)]
            rates[name] = [flop / s / 1e12 for s in seconds] + [3 * flop / sum(seconds) / 1e12]
            print(f"{f'{channels}, {size[0]}x{size[1]}x{size[2]}':<22}{name:<20}"
                  + "".join(f"{r:>{width}.3f}" for r, width in zip(rates[name], (9, 11, 13, 11))))
        ratio = [a / b for a, b in zip(*rates.values())]
        print(f"{'':<22}{'bf16 / fp32':<20}" + "".join(f"{r:>{width}.2f}x" for r, width in zip(ratio, (8, 10, 12, 10))))


if __name__ == "__main__":
    main()
