"""One published-size forward pass (64×192×192) as the sliding window runs it: seconds, FLOP/s, and where
the time goes (not a test).

The published configuration with seeded random weights, the allocator `uniseg predict` uses, inference
mode, uniseg's inference kernels and its layout (bf16 on the CPU: channels-last); one warm-up pass, then
the median of `--passes` timed passes per precision, and one profiled pass that splits the time into
convolutions and everything else.

On the CPU each precision is also set against the peak measured in the same process, right after its
passes (the clock of a shared virtual machine drifts by ±15% between runs): the best FLOP/s of single
large 3×3×3 oneDNN convolutions in the pass's layout, which is what the hardware demonstrably delivers
(a lower bound of its theoretical peak).

    python benchmarks/forward_profile.py [--precisions fp32,bf16] [--passes 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

from uniseg_cli.inference.allocator import tune_allocator

tune_allocator()  # what `uniseg predict` does in its process, before torch is imported

import torch  # noqa: E402
from measures import best_seconds, conv3x3_operands, flops_per_forward  # noqa: E402

CONVOLUTIONS = ("aten::mkldnn_convolution", "aten::slow_conv3d_forward", "aten::slow_conv_transpose3d",
                "aten::cudnn_convolution", "aten::cudnn_convolution_transpose", "aten::_convolution")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated; fast = what --fast picks")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from uniseg_cli.config import UniSegConfig
    from uniseg_cli.inference.runtime import AUTOCAST_DTYPES, channels_last, precision_context, resolve_precision
    from uniseg_cli.model.blocks import inference_kernels
    from uniseg_cli.model.network import UniSeg

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = UniSeg(UniSegConfig()).to(device).eval()
    x = torch.randn(1, 1, *model.config.patch_size, device=device)
    flops = flops_per_forward(model.config)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads; one forward "
          f"{flops / 1e12:.3f} TFLOP")

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for asked in args.precisions.split(","):
        precision = resolve_precision(asked, device)
        layout = channels_last(precision, device)
        model.set_channels_last(layout)
        with torch.inference_mode(), precision_context(precision, device), inference_kernels(device):
            model(x, 1)
            times = []
            for _ in range(args.passes):
                synchronize()
                start = time.perf_counter()
                model(x, 1)
                synchronize()
                times.append(time.perf_counter() - start)
            with torch.profiler.profile() as profile:
                model(x, 1)
                synchronize()
        events = profile.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        convolution = sum(e.self_cpu_time_total for e in events if e.key in CONVOLUTIONS)
        seconds = statistics.median(times)
        precision = f"{asked} ({precision}{', channels-last' if layout else ''})" if asked != precision else \
            f"{precision}{' channels-last' if layout else ''}"
        print(f"{precision}: {seconds:.2f} s per pass (of {', '.join(f'{t:.2f}' for t in times)}), "
              f"{flops / seconds / 1e12:.3f} TFLOP/s; convolutions {100 * convolution / total:.0f}% of the "
              f"profiled time, {flops / (seconds * convolution / total) / 1e12:.3f} TFLOP/s while convolving",
              flush=True)
        if device.type == "cpu":
            peak = measured_peak(AUTOCAST_DTYPES.get(resolve_precision(asked, device), torch.float32), layout)
            print(f"{precision}: measured peak {peak / 1e12:.3f} TFLOP/s; a pass reaches "
                  f"{100 * flops / seconds / peak:.0f}% of it", flush=True)


#: (channels, z, y, x) of the calibration convolutions: the fastest of a grid tried on the test CPU.
PEAK_SHAPES = ((128, 16, 32, 32), (256, 16, 48, 48), (320, 16, 32, 32))


def measured_peak(dtype: torch.dtype, layout_channels_last: bool = False, repeats: int = 7) -> float:
    """FLOP/s of the fastest of several large 3×3×3 oneDNN convolutions (best of ``repeats`` each)."""
    best = 0.0
    for channels, *size in PEAK_SHAPES:
        x, weight, flop = conv3x3_operands(channels, tuple(size), dtype=dtype, channels_last=layout_channels_last)
        with torch.inference_mode():
            seconds = best_seconds(lambda: torch.ops.aten.mkldnn_convolution(
                x, weight, None, (1, 1, 1), (1, 1, 1), (1, 1, 1), 1), repeats)
        best = max(best, flop / seconds)
    return best


if __name__ == "__main__":
    main()
