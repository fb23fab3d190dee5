"""``uniseg weights``: the model registry, downloads, checks, conversion and publishing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from uniseg_cli.devices import DEVICE_HELP

app = typer.Typer(help="Model weights: list, download, inspect, verify, convert and publish models.",
                  no_args_is_help=True, rich_markup_mode=None)

MODEL_HELP = "A model folder, a registry name (`uniseg weights list`) or a Hub name owner/name[@revision]."


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout.")) -> None:
    """List the registry's models and the uniseg models in the Hugging Face cache, with sizes."""
    from uniseg_cli.catalog import list_models

    models = list_models()
    if as_json:
        print(json.dumps(models, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title_justify="left", title="uniseg models (registry and cache)")
    for column in ("name", "source", "tasks", "licence", "cached"):
        table.add_column(column)
    for m in models:
        cached = f"{m['cached_mib']:.1f} MiB" if m["cached_mib"] is not None else "no"
        table.add_row(m["name"] + (" (default)" if m.get("default") else ""), m["source"],
                      str(len(m["tasks"])) if m["tasks"] else "?", m["license"] or "?", cached)
    if not models:
        typer.echo("No models in the registry or the cache yet. Convert the published checkpoint with "
                   "`uniseg weights import`, or download one with `uniseg weights download owner/name`.", err=True)
        return
    Console(soft_wrap=False).print(table)


@app.command("download")
def download(model: str = typer.Argument(..., help="A registry name or a Hub name owner/name[@revision].")) -> None:
    """Fetch a model into the Hugging Face cache (verified against the registry's sha256s); print its folder."""
    from uniseg_cli.hub import resolve_model

    print(resolve_model(model).path)


@app.command("info")
def info(model: str = typer.Argument(..., help=MODEL_HELP),
         as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout.")) -> None:
    """Show a model's configuration, tasks, parameter count, licence and source."""
    from uniseg_cli.catalog import describe_model

    description = describe_model(model)
    if as_json:
        print(json.dumps(description, indent=2))
        return
    arch = description["config"]["architecture"]
    lines = [
        f"model:       {description['spec']}",
        f"folder:      {description['path']}",
        f"source:      {description['source'] or '(not recorded)'}",
        f"licence:     {description['license'] or '(not stated)'}",
        f"parameters:  {description['parameters']:,}",
        f"patch:       {' x '.join(map(str, arch['patch_size']))}, features {description['stage_features']}, "
        f"{arch['num_classes']} outputs, inputs {'/'.join(map(str, arch['input_channels']))} channels",
        "tasks:       " + ", ".join(f"{t['id']} {t['key']}" for t in description["config"]["tasks"]),
    ]
    print("\n".join(lines))


@app.command("verify")
def verify(model: str = typer.Argument(..., help=MODEL_HELP)) -> None:
    """Re-hash a model's files; for a registry model, check them against its pinned sha256s (exit 1 if not)."""
    from uniseg_cli.catalog import verify_model

    for line in verify_model(model):
        print(line)


@app.command("push")
def push(
    folder: Path = typer.Argument(..., help="The model folder to publish."),
    repo: str = typer.Argument(..., help="Hub repository owner/name (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    message: str = typer.Option("Upload uniseg model", "--message", help="Commit message."),
) -> None:
    """Publish a model folder to the Hub with a generated model card (README.md); print the commit to pin.

    Needs a write token (HF_TOKEN or `hf auth login`). The folder itself is not modified.
    """
    from uniseg_cli.catalog import push_model

    print(push_model(folder, repo, private=private, message=message))


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
