"""``uniseg export``: a model as a clean safetensors folder, TorchScript or ONNX, checked against PyTorch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def export(
    model: str = typer.Argument(..., metavar="MODEL", help="Model folder, registry name or Hub name."),
    fmt: str = typer.Option(..., "--format", "-f", metavar="safetensors|torchscript|onnx", help="What to write."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder to write (default: <model>-<format> here)."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Build this task into the graph (TorchScript/ONNX then take only the image) and check only it."),
    channels: Optional[int] = typer.Option(None, "--channels", min=1, help="Only the graph for this input channel count (default: one file per count the model takes)."),
    half: bool = typer.Option(False, "--half", help="safetensors: store float16 weights (half the size; loaded as float32)."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier export in the output folder (only after the new one passed its checks); a folder holding anything uniseg did not write there is never replaced."),
    as_json: bool = typer.Option(False, "--json", help="Print the files and the measured differences as JSON."),
) -> None:
    """Export a model and check it: every written file is run on a seeded random patch for each task
    it serves and compared with the PyTorch model (max |difference| <= 1e-3 for float32, 5e-2 for
    --half); nothing is written if a check fails.

    \b
    Files:
      safetensors  config.json, model.safetensors, README.md (a model folder for --model)
      torchscript  uniseg_<N>ch.pt: (image float32 [B,N,Z,Y,X], task int64 [1]) -> logits
      onnx         uniseg_<N>ch.onnx (opset 18): inputs image, task; output logits; batch dynamic

    \b
    Examples:
      uniseg export my-model --format onnx -o my-model-onnx
      uniseg export my-model --format torchscript --task kidney
      uniseg export my-model --format safetensors --half -o my-model-fp16
    """
    from uniseg_cli.model.exporters import export_model

    report = export_model(model, fmt, output, task=task, channels=channels, half=half, force=force)
    if as_json:
        print(json.dumps(report.to_json()))
    else:
        worst = max(report.max_abs_diff.values(), default=float("nan"))
        print(report.output)
        import logging

        logging.getLogger("uniseg_cli").info(
            "%s: %s; largest |exported - pytorch| over %d check(s): %.3g%s", report.output, ", ".join(report.files),
            len(report.max_abs_diff), worst, f" (not run: {', '.join(report.unchecked)})" if report.unchecked else "")
