"""An independent, functional statement of the published UniSeg forward, read off docs/pipeline.md §1.

It uses only the state dict and torch.nn.functional, with the published strides, eps and slope
written out, so a test comparing it with ``UniSeg`` checks layer order and hyper-parameters rather
than our code against itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PUBLISHED_STRIDES = [(1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)]


def _block(x, sd, prefix, stride=(1, 1, 1), conv="conv"):
    weight, bias = sd[f"{prefix}.{conv}.weight"], sd[f"{prefix}.{conv}.bias"]
    x = F.conv3d(x, weight, bias, stride=stride, padding=[k // 2 for k in weight.shape[2:]])
    x = F.instance_norm(x, weight=sd[f"{prefix}.instnorm.weight"], bias=sd[f"{prefix}.instnorm.bias"], eps=1e-5)
    return F.leaky_relu(x, 0.01)


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, task: int) -> list[torch.Tensor]:
    """Logits of every decoder level, finest first (the deep-supervision order)."""
    skips = []
    x = _block(x, sd, "conv_blocks_context.0.blocks.0", conv=f"conv_{x.shape[1]}")
    x = _block(x, sd, "conv_blocks_context.0.blocks.1")
    skips.append(x)
    for d in range(1, 5):
        x = _block(x, sd, f"conv_blocks_context.{d}.blocks.0", PUBLISHED_STRIDES[d - 1])
        x = _block(x, sd, f"conv_blocks_context.{d}.blocks.1")
        skips.append(x)
    x = _block(x, sd, "conv_blocks_context.5.0.blocks.0", PUBLISHED_STRIDES[4])
    x = _block(x, sd, "conv_blocks_context.5.1.blocks.0")
    fused = torch.cat([x, sd["intermedia_prompt"].repeat(x.shape[0], 1, 1, 1, 1)], dim=1)
    for i in range(3):
        fused = _block(fused, sd, f"fusion_layer.blocks.{i}")
    x = torch.cat([x, fused[:, task:task + 1]], dim=1)
    outputs = []
    for u in range(5):
        weight = sd[f"tu.{u}.weight"]
        x = F.conv_transpose3d(x, weight, stride=tuple(weight.shape[2:]))
        x = torch.cat([x, skips[4 - u]], dim=1)
        x = _block(x, sd, f"conv_blocks_localization.{u}.0.blocks.0")
        x = _block(x, sd, f"conv_blocks_localization.{u}.1.blocks.0")
        outputs.append(F.conv3d(x, sd[f"seg_outputs.{u}.weight"]))
    return outputs[::-1]
