"""``uniseg weights``: model weight files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from uniseg_cli.devices import DEVICE_HELP

app = typer.Typer(help="Manage model weights (convert the published checkpoint).", no_args_is_help=True,
                  rich_markup_mode=None)


@app.command("import")
def import_(
    checkpoint: Path = typer.Argument(..., help="The published nnU-Net v1 checkpoint, e.g. model_final_checkpoint.model."),
    output: Path = typer.Option(..., "--output", "-o", help="Model folder to write (config.json + model.safetensors)."),
    plans: Optional[Path] = typer.Option(None, "--plans", help="The checkpoint's .model.pkl plans, to cross-check the inferred configuration."),
    license: str = typer.Option("", "--license", help="Licence of the weights, recorded in config.json (the published UniSeg weights are non-commercial)."),
    device: str = typer.Option("auto", "--device", help=f"Where to run the agreement check: {DEVICE_HELP}."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
) -> None:
    """Convert a published UniSeg checkpoint into a safe model folder, once.

    The pickled checkpoint and plans are read through an allow-list (no code in them can run), the
    network configuration is inferred from the tensor shapes, and the written folder is reloaded and
    run on the same patch as the checkpoint to prove they agree. Prints the folder path on stdout.

    \b
    Example:
      uniseg weights import model_final_checkpoint.model \\
          --plans model_final_checkpoint.model.pkl -o uniseg-11task
    """
    import logging

    from uniseg_cli.devices import pick_device
    from uniseg_cli.model.checkpoint_import import import_checkpoint

    log = logging.getLogger("uniseg_cli")
    target = pick_device(device)
    if output.resolve() == checkpoint.resolve():
        from uniseg_cli.errors import UsageError

        raise UsageError(f"{output}: the output folder must not be the checkpoint itself")
    report = import_checkpoint(checkpoint, output, plans=plans, device=target, overwrite=force, license=license)
    c = report.config
    log.info("configuration: patch %s, features %s, %d tasks, %d classes, inputs %s channels",
             "×".join(map(str, c.patch_size)), list(c.stage_features), c.num_tasks, c.num_classes,
             "/".join(map(str, c.input_channels)))
    if plans is not None and not report.plans_disagreements:
        log.info("plans agree with the weights (patch size, kernels, features)")
    log.info("%d tensors (%s parameters) written bit-identical; logits of the saved folder vs the checkpoint "
             "on one patch (task 0, %s): max |diff| = %.3g", report.tensors, f"{report.parameters:,}", target,
             report.max_abs_diff)
    print(report.output)
