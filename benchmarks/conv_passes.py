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

import torch
from measures import best_seconds, conv3x3_operands

from uniseg_cli.config import UniSegConfig

PATCH = (32, 96, 96)
LAYOUTS = {"bf16 channels-last": (torch.bfloat16, True), "fp32 contiguous": (torch.float32, False)}


def stages(config: UniSegConfig, count: int = 4) -> list[tuple[int, tuple[int, ...]]]:
    """(features, size) of the network's first ``count`` stages at its patch: the stride-1 convolutions."""
    size, found = tuple(config.patch_size), []
    for features, pool in zip(config.stage_features[:count], ((1, 1, 1), *config.pool_kernels)):
        size = tuple(s // p for s, p in zip(size, pool))
        found.append((features, size))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    one = [1, 1, 1]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"TFLOP/s of 3x3x3 convolutions, batch {args.batch}")
    print(f"{'channels, size':<22}{'layout':<20}{'forward':>9}{'data grad':>11}{'weight grad':>13}{'all three':>11}")
    for channels, size in stages(UniSegConfig(patch_size=PATCH)):
        rates: dict[str, list[float]] = {}
        for name, (dtype, channels_last) in LAYOUTS.items():
            x, w, flop = conv3x3_operands(channels, size, batch=args.batch, dtype=dtype, channels_last=channels_last)
            g = torch.randn_like(x)

            def backward(mask: list[bool]) -> float:
                return best_seconds(lambda: torch.ops.aten.convolution_backward(
                    g, x, w, [channels], one, one, one, False, [0, 0, 0], 1, mask), args.repeats)

            seconds = [best_seconds(lambda: torch.ops.aten.mkldnn_convolution(x, w, None, one, one, one, 1),
                                    args.repeats),
                       backward([True, False, False]), backward([False, True, True])]
            rates[name] = [flop / s / 1e12 for s in seconds] + [3 * flop / sum(seconds) / 1e12]
            print(f"{f'{channels}, {size[0]}x{size[1]}x{size[2]}':<22}{name:<20}"
                  + "".join(f"{r:>{width}.3f}" for r, width in zip(rates[name], (9, 11, 13, 11))))
        ratio = [a / b for a, b in zip(*rates.values())]
        print(f"{'':<22}{'bf16 / fp32':<20}" + "".join(f"{r:>{width}.2f}x" for r, width in zip(ratio, (8, 10, 12, 10))))


if __name__ == "__main__":
    main()
