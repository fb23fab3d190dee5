"""The UniSeg network: a 3D U-Net whose decoder is told the task by a learned universal prompt.

Module and parameter names, their registration order and shapes are the published checkpoint's
state-dict format (docs/pipeline.md §1; the full list is pinned in the tests). The encoder and decoder are
therefore not wrapped in sub-modules of their own: their parts hang directly off ``UniSeg`` as
``conv_blocks_context``, ``conv_blocks_localization``, ``tu`` and ``seg_outputs``.
"""

from __future__ import annotations

import torch
from torch import nn

from uniseg_cli.config import UniSegConfig
from uniseg_cli.errors import InputShapeError
from uniseg_cli.model.blocks import LEAKY_SLOPE, Conv3d, ConvBlock, MultiInputConvBlock, StackedConvBlocks


def build_encoder(config: UniSegConfig) -> nn.ModuleList:
    """Stages 0…n: conv blocks, down-sampling by the first block's stride (no pooling layers)."""
    features = config.stage_features
    stages = nn.ModuleList()
    for d, (out_ch, kernel) in enumerate(zip(features, config.conv_kernels)):
        stride = config.pool_kernels[d - 1] if d > 0 else (1, 1, 1)
        if d == 0:
            first: nn.Module = MultiInputConvBlock(config.input_channels, out_ch, kernel=kernel)
            rest = [ConvBlock(out_ch, out_ch, kernel=kernel) for _ in range(config.convs_per_stage - 1)]
            stages.append(StackedConvBlocks([first, *rest]))
        elif d < config.num_stages - 1:
            stages.append(StackedConvBlocks.uniform(features[d - 1], out_ch, config.convs_per_stage,
                                                    kernel=kernel, first_stride=stride))
        else:
            # The bottleneck is stored as two stacks (nnU-Net v1's layout): the strided part, then one block.
            stages.append(nn.Sequential(
                StackedConvBlocks.uniform(features[d - 1], out_ch, config.convs_per_stage - 1,
                                          kernel=kernel, first_stride=stride),
                StackedConvBlocks.uniform(out_ch, out_ch, 1, kernel=kernel),
            ))
    return stages


def build_fusion(config: UniSegConfig) -> StackedConvBlocks:
    """Three 3×3×3 blocks mixing bottleneck features with the prompt into one map per task."""
    width_in = config.stage_features[-1] + config.num_tasks
    hidden = config.fusion_features
    k = (3, 3, 3)
    return StackedConvBlocks([
        ConvBlock(width_in, hidden, kernel=k),
        ConvBlock(hidden, hidden, kernel=k),
        ConvBlock(hidden, config.num_tasks, kernel=k),
    ])


def build_decoder(config: UniSegConfig) -> tuple[nn.ModuleList, nn.ModuleList, nn.ModuleList]:
    """Transposed convs, localization stacks and seg heads, coarse to fine, read off the encoder layout.

    The first transposed conv takes one extra channel: the task's prompt map.
    """
    features = config.stage_features
    n = len(config.pool_kernels)
    tu, localization, heads = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
    from_below = features[-1] + (1 if config.prompted else 0)
    for u in range(n):
        skip = features[n - 1 - u]
        pool = config.pool_kernels[n - 1 - u]
        kernel = config.conv_kernels[n - u]
        tu.append(nn.ConvTranspose3d(from_below, skip, pool, pool, bias=False))
        localization.append(nn.Sequential(
            StackedConvBlocks.uniform(2 * skip, skip, config.convs_per_stage - 1, kernel=kernel),
            StackedConvBlocks.uniform(skip, skip, 1, kernel=kernel),
        ))
        heads.append(Conv3d(skip, config.num_classes, 1, 1, 0, bias=False))
        from_below = skip
    return tu, localization, heads


class UniSeg(nn.Module):
    """UniSeg for one configuration; ``forward(x, task)`` segments a batch of patches for one task.

    In training mode (with ``deep_supervision``) the forward returns the logits of every decoder
    level, finest first; in eval mode only the full-resolution logits. No softmax is applied.
    """

    def __init__(self, config: UniSegConfig) -> None:
        super().__init__()
        self.config = config
        self.deep_supervision = True
        encoder = build_encoder(config)
        tu, localization, heads = build_decoder(config)
        # Registration order = state-dict order of the published checkpoint.
        if config.prompted:
            prompt = torch.empty(1, config.num_tasks, *config.prompt_shape)
            self.intermedia_prompt = nn.Parameter(prompt if prompt.is_meta else prompt.normal_())  # = randn
            self.fusion_layer = build_fusion(config)
        self.conv_blocks_localization = localization
        self.conv_blocks_context = encoder
        self.tu = tu
        self.seg_outputs = heads
        self.apply(init_he_normal)
        self.channels_last = False

    def set_channels_last(self, channels_last: bool) -> UniSeg:
        """Lay the weights (and so every activation) out channels-last, or back to contiguous.

        oneDNN's bf16 convolutions work natively on channels-last (NDHWC) data: there a whole bf16 pass
        on the CPU keeps one layout from input to logits (``blocks.norm_activation`` normalises in it too)
        instead of reordering around every convolution. fp32 stays contiguous, the published
        computation bit for bit; ``runtime.channels_last`` says which precision gets which. The
        parameters stay the same objects (an optimiser keeps them) and the state dict the same values.
        """
        if channels_last != self.channels_last:
            self.to(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
            self.channels_last = channels_last
        return self

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse what the network cannot take, with the expected shape in the message."""
        if x.ndim != 5:
            raise InputShapeError(f"expected a 5-D tensor (batch, channels, z, y, x), got shape {tuple(x.shape)}")
        if x.shape[1] not in self.config.input_channels:
            options = ", ".join(map(str, self.config.input_channels))
            raise InputShapeError(f"the model takes {options} input channels, got {x.shape[1]}")
        if tuple(x.shape[2:]) != self.config.patch_size:
            raise InputShapeError(
                f"the model takes patches of exactly {self.config.patch_size} voxels (its prompt is tied to "
                f"the patch size), got {tuple(x.shape[2:])}"
            )

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Skip features of stages 0…n-1 followed by the bottleneck; shared by every task."""
        self.check_input(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        features = []
        for stage in self.conv_blocks_context:
            x = stage(x)
            features.append(x)
        return features

    def task_maps(self, bottleneck: torch.Tensor) -> torch.Tensor | None:
        """The fusion of bottleneck features and universal prompt: one map per task, (B, T, …).

        It does not depend on the task asked, so several tasks of one input share it. A model without
        the prompt (a downstream fine-tune) has none.
        """
        if not self.config.prompted:
            return None
        prompt = self.intermedia_prompt.expand(bottleneck.shape[0], -1, -1, -1, -1)
        return self.fusion_layer(torch.cat([bottleneck, prompt], dim=1))

    def decode(self, features: list[torch.Tensor], task: int,
               task_maps: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Logits for ``task`` from the encoder's features (see ``forward`` for the return value).

        ``task_maps`` (from ``task_maps(features[-1])``) may be passed to reuse them across tasks.
        """
        if not 0 <= task < self.config.num_tasks:
            raise InputShapeError(f"task index {task} is out of range: the model has {self.config.num_tasks} tasks")
        maps = self.task_maps(features[-1]) if task_maps is None else task_maps
        return self.decode_with_map(features, None if maps is None else maps[:, task:task + 1])

    def decode_with_map(self, features: list[torch.Tensor],
                        task_map: torch.Tensor | None) -> torch.Tensor | list[torch.Tensor]:
        """The decoder given the task's own prompt map ``(B, 1, …)`` (None without a prompt); exported
        graphs pick it with a tensor index, so that one graph serves every task."""
        *skips, x = features
        if task_map is not None:
            x = torch.cat([x, task_map], dim=1)
        outputs = []
        for u, (up, local, head) in enumerate(zip(self.tu, self.conv_blocks_localization, self.seg_outputs)):
            first, *rest = [block for stack in local for block in stack.blocks]
            x = first.forward_concatenated(up(x), skips[-(u + 1)])
            for block in rest:
                x = block(x)
            if self.training and self.deep_supervision or u == len(self.tu) - 1:
                outputs.append(head(x))
        if self.training and self.deep_supervision:
            return outputs[::-1]
        return outputs[-1]

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor | list[torch.Tensor]:
        return self.decode(self.encode(x), task)


def init_he_normal(module: nn.Module) -> None:
    """nnU-Net's ``InitWeights_He(1e-2)``: He normal conv weights, zero biases.

    Nothing to draw for a network built on the meta device to receive loaded weights: torch's random
    functions on meta tensors import its compiler stack (1.1 s of every ``uniseg predict``, with the
    prompt's) to initialise nothing.
    """
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)) and not module.weight.is_meta:
        nn.init.kaiming_normal_(module.weight, a=LEAKY_SLOPE)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
