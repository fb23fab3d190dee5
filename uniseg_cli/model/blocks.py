"""The building blocks of the UniSeg network, named as in the published state dict.

Every block is ``Conv3d(bias) → InstanceNorm3d(eps 1e-5, affine) → LeakyReLU(0.01)``, as in
nnU-Net v1's ``ConvDropoutNormNonlin`` without dropout; the attribute names (``conv``,
``instnorm``, ``blocks``) are part of the checkpoint format.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from uniseg_cli.errors import InputShapeError

NORM_EPS = 1e-5
LEAKY_SLOPE = 0.01
#: A channels-last activation with fewer channels than this is normalised in the contiguous layout
#: (``norm_activation``): torch's channels-last batch norm vectorises along the channels, and with 4 or 8
#: of them it took 2-6x as long as the contiguous instance norm and both layout copies together; from 16
#: on it is the faster one (bf16 on AVX-512, forward and backward).
CONTIGUOUS_NORM_BELOW = 16

Triple = tuple[int, int, int]


_INFERENCE: contextvars.ContextVar[torch.device | None] = contextvars.ContextVar("uniseg_inference", default=None)


@contextlib.contextmanager
def inference_kernels(device: torch.device) -> Iterator[None]:
    """Send every float32 CPU convolution to oneDNN while inferring on ``device`` (same result up to
    summation order).

    PyTorch's heuristic runs a 3D convolution of one patch with few channels (a small model, or the
    published model's coarsest stages) through its im2col fallback instead of oneDNN, several times
    slower (docs/benchmarks.md, "Small models"). Only where no gradients are recorded: training,
    tracing and export see plain modules.
    """
    token = _INFERENCE.set(device)
    try:
        yield
    finally:
        _INFERENCE.reset(token)


def _cpu_inference(x: torch.Tensor) -> bool:
    """Inside ``inference_kernels``, with no gradients recorded, on the CPU: where oneDNN is forced."""
    return _INFERENCE.get() is not None and not torch.is_grad_enabled() and x.device.type == "cpu"


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (same parameters and state-dict names) that honours ``inference_kernels`` and
    keeps bf16 training off a oneDNN kernel that returns garbage."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if _bf16_weight_gradient_unsafe(x, self.kernel_size):
            # The weight gradient of oneDNN's bf16 convolution reads memory it never wrote when the
            # input is thinner than the kernel along an axis (seen: depth 2 under a 3-deep kernel, both
            # layouts; fp32 never): NaN or huge values whenever the allocator hands back a freed
            # tensor's bytes, then NaN in every weight after one optimiser step. Such inputs are a
            # small model's coarsest stages, a few voxels: computing them in fp32 costs nothing.
            with torch.autocast("cpu", enabled=False):
                return super()._conv_forward(x.float(), weight.float(), None if bias is None else bias.float())
        if (_cpu_inference(x) and x.dtype == torch.float32 and self.padding_mode == "zeros"
                and not torch.is_autocast_enabled("cpu") and torch.backends.mkldnn.is_available()):
            return torch.ops.aten.mkldnn_convolution(x, weight, bias, self.padding, self.stride, self.dilation,
                                                     self.groups)
        return super()._conv_forward(x, weight, bias)


def _bf16_weight_gradient_unsafe(x: torch.Tensor, kernel: Sequence[int]) -> bool:
    """A CPU bf16 (autocast) convolution whose gradient is recorded on an input smaller than its kernel."""
    return (x.device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and any(size < k for size, k in zip(x.shape[2:], kernel)))


def norm_activation(y: torch.Tensor, norm: nn.InstanceNorm3d, activation: nn.LeakyReLU) -> torch.Tensor:
    """``activation(norm(y))``, the activation in place, keeping ``y``'s memory layout.

    On a contiguous tensor (every fp32 computation, as published) torch's own instance norm. On a
    channels-last tensor (the bf16 CPU path, ``UniSeg.set_channels_last``) torch's instance norm would
    first copy it to the contiguous layout and hand the next convolution a layout oneDNN must reorder
    again (more than half of a bf16 pass went to such copies); so each sample is normalised by the
    training-mode batch norm, which for one sample computes exactly the instance-norm statistics, works
    on channels-last tensors in place of layout, and accumulates them in float32 even for bf16 input.
    The samples are taken by ``split``, not by slicing: a slice's backward writes its gradient into a
    zeroed contiguous tensor the size of the batch, one per sample, so the gradient reached the
    convolution contiguous and was reordered there (more time in those fills, copies and sums than in
    the norms themselves); ``split``'s backward concatenates the samples' gradients, channels-last.
    An activation of few channels (a small model's first stages) is normalised contiguous and laid out
    channels-last again (``CONTIGUOUS_NORM_BELOW``).
    """
    if not _channels_last(y):
        return activation(norm(y))
    if y.shape[1] < CONTIGUOUS_NORM_BELOW:
        return activation(norm(y.contiguous())).contiguous(memory_format=torch.channels_last_3d)
    samples = [F.batch_norm(sample, None, None, norm.weight, norm.bias, True, 0.0, norm.eps)
               for sample in y.split(1)]
    return activation(samples[0] if len(samples) == 1 else torch.cat(samples))


def _channels_last(y: torch.Tensor) -> bool:
    """Whether ``y`` is laid out channels-last (and not also contiguous, as a 1-channel tensor is)."""
    return y.ndim == 5 and not y.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last_3d)


def _padding(kernel: Triple) -> Triple:
    # Kernels are 1 or 3 per axis: padding k // 2 keeps the shape (up to the stride).
    return tuple(k // 2 for k in kernel)  # type: ignore[return-value]


class ConvBlock(nn.Module):
    """One convolution, instance norm and leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel: Triple, stride: Triple = (1, 1, 1)) -> None:
        super().__init__()
        self.conv = Conv3d(in_channels, out_channels, kernel, stride, _padding(kernel), bias=True)
        self.instnorm = nn.InstanceNorm3d(out_channels, eps=NORM_EPS, affine=True)
        self.lrelu = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_activation(self.conv(x), self.instnorm, self.lrelu)

    def forward_concatenated(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``forward(torch.cat([a, b], 1))`` without the concatenation: a convolution is a sum over its
        input channels, so it is two convolutions with the two halves of the weight, added. The decoder's
        full-resolution block then never holds a 64-channel copy of the patch (600 MB in the published
        configuration, twice while oneDNN reorders it); ``a`` is freed as soon as it is used.
        """
        weight, split = self.conv.weight, a.shape[1]
        y = self.conv._conv_forward(a, weight[:, :split], self.conv.bias)
        del a
        y += self.conv._conv_forward(b, weight[:, split:], None)
        return norm_activation(y, self.instnorm, self.lrelu)


class MultiInputConvBlock(nn.Module):
    """The first block of the encoder: one input convolution per accepted channel count.

    UniSeg takes CT or MR (1 channel), CT+PET (2) and four MR sequences (4) with the same network;
    ``conv_<n>`` handles ``n`` channels and all share the block's instance norm.
    """

    def __init__(self, in_channel_options: Sequence[int], out_channels: int, *, kernel: Triple) -> None:
        super().__init__()
        self.in_channel_options = tuple(in_channel_options)
        for n in self.in_channel_options:
            self.add_module(f"conv_{n}", Conv3d(n, out_channels, kernel, 1, _padding(kernel), bias=True))
        self.instnorm = nn.InstanceNorm3d(out_channels, eps=NORM_EPS, affine=True)
        self.lrelu = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        if channels not in self.in_channel_options:
            options = ", ".join(map(str, self.in_channel_options))
            raise InputShapeError(f"the model takes {options} input channels, got {channels}")
        return norm_activation(getattr(self, f"conv_{channels}")(x), self.instnorm, self.lrelu)


class StackedConvBlocks(nn.Module):
    """A sequence of conv blocks stored under ``.blocks``; only the first one strides."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    @classmethod
    def uniform(cls, in_channels: int, out_channels: int, count: int, *, kernel: Triple,
                first_stride: Triple = (1, 1, 1)) -> StackedConvBlocks:
        """``count`` blocks of ``out_channels``; the first maps ``in_channels`` and strides."""
        blocks = [ConvBlock(in_channels, out_channels, kernel=kernel, stride=first_stride)]
        blocks += [ConvBlock(out_channels, out_channels, kernel=kernel) for _ in range(count - 1)]
        return cls(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)
