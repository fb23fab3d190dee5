"""The README.md model card that travels with a published model folder (Hugging Face convention)."""

from __future__ import annotations

from uniseg_cli import __version__
from uniseg_cli.config import UniSegConfig


def model_card(config: UniSegConfig, *, repo: str, parameters: int, license_text: str | None = None,
               provenance: str = "") -> str:
    """Markdown with YAML front matter: what the model segments, from what, under which licence.

    An installed model's card also carries the full licence text the user accepted and where its
    files came from, so that both travel with the folder if it is copied elsewhere.
    """
    license_line = config.license or "not stated: ask the model's authors before using it"
    if license_text:
        license_line += "\n\n```text\n" + license_text.strip() + "\n```"
    rows = "\n".join(
        f"| {t.id} | `{t.key}` | {', '.join(c.name for c in t.channels)} | {', '.join(t.labels)} | "
        f"{' × '.join(f'{s:g}' for s in t.target_spacing)} |" for t in config.tasks)
    return f"""---
library_name: uniseg
license: other
license_name: see-model-card
tags:
- medical-imaging
- segmentation
- 3d
- uniseg
---

# {repo.split('/')[-1]}

A [UniSeg](https://arxiv.org/abs/2304.03493) model (prompt-driven universal 3D segmentation) for the
[`uniseg`](https://pypi.org/project/uniseg-cli/) command-line tool: one network, told which task by a
learned prompt. Files: `config.json` (architecture, tasks, licence) and `model.safetensors` (weights; no
pickled code).

## Licence of the weights

{license_line}

## Tasks

| id | task | input channels (in order) | labels (1, 2, …) | spacing z × y × x (mm) |
|---|---|---|---|---|
{rows}

## Network

Patch {' × '.join(map(str, config.patch_size))} voxels, features per stage {', '.join(map(str, config.stage_features))},
{config.num_classes} output channels, input convolutions for {', '.join(map(str, config.input_channels))} channels,
{parameters:,} parameters.

## How it was made

{config.source or "Not recorded."}
{provenance}
Published with uniseg {__version__}.

## Use

```bash
pip install uniseg-cli
uniseg predict scan.nii.gz --task {config.tasks[0].key} --model {repo} -o {config.tasks[0].key}.nii.gz
```
"""
