"""``uniseg weights``: the model registry, downloads, checks, conversion and publishing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from uniseg_cli.devices import DEVICE_HELP

if TYPE_CHECKING:
    from uniseg_cli.weights.hub import RegistryEntry

app = typer.Typer(help="Model weights: list, download, set the default, inspect, verify, convert and publish models.",
                  no_args_is_help=True, rich_markup_mode=None)

MODEL_HELP = "A model folder, an installed or registry name (`uniseg weights list`) or a Hub name owner/name[@revision]."


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout.")) -> None:
    """List the registry's models, the models installed in your store and the uniseg models in the
    Hugging Face cache, with their sizes; (default) marks the one used without --model."""
    from uniseg_cli.weights.catalog import list_models

    models = list_models()
    if as_json:
        print(json.dumps(models, indent=2))
        return
    from rich.table import Table

    from uniseg_cli.io.stdout import data_console

    table = Table(title_justify="left", title="uniseg models (registry, store and cache)")
    for column in ("name", "source", "tasks", "licence", "installed"):
        table.add_column(column)
    for m in models:
        installed = f"{m['installed_mib']:.1f} MiB" if m["installed_mib"] is not None else "no"
        table.add_row(m["name"] + (" (default)" if m.get("default") else ""), m["source"],
                      str(len(m["tasks"])) if m["tasks"] else "?", m["license"].split(" (")[0] or "?", installed)
    data_console().print(table)


@app.command("download")
def download(
    model: str = typer.Argument(..., help="A registry name (uniseg-11task: the published weights) or a Hub name owner/name[@revision]."),
    accept_license: bool = typer.Option(False, "--accept-license", help="Accept the model's licence (shown first) without being asked; needed when not on a terminal."),
    device: str = typer.Option("auto", "--device", help=f"Where to run a conversion's agreement check: {DEVICE_HELP}."),
    force: bool = typer.Option(False, "--force", help="Download and convert again even if the model is installed."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or log lines."),
) -> None:
    """Install a model once: fetch, verify, convert if needed, and make it the default if none is set.

    The published UniSeg weights (uniseg-11task, non-commercial licence) exist only as nnU-Net v1
    pickles on Google Drive: they are downloaded (resumably), checked against the published layout,
    converted safely (no pickled code runs) and stored in $UNISEG_HOME, else $XDG_CACHE_HOME/uniseg,
    else ~/.cache/uniseg. Set UNISEG_WEIGHTS_MIRROR=URL to fetch the published file names from your own
    server instead. Hub names go to the Hugging Face cache. Prints the model's folder.

    \b
    Examples:
      uniseg weights download uniseg-11task                  asks to accept the licence, once
      uniseg weights download uniseg-11task --accept-license
      UNISEG_WEIGHTS_MIRROR=https://models.example.org/uniseg uniseg weights download uniseg-11task
    """
    import logging

    from uniseg_cli.weights.hub import load_registry, resolve_model

    if quiet:
        logging.getLogger("uniseg_cli").setLevel(logging.WARNING)
    entry = load_registry().models.get(model)
    if entry is None:  # a Hub name: the Hub's cache is its store
        print(resolve_model(model).path)
        return
    from uniseg_cli.devices import pick_device
    from uniseg_cli.weights import store
    from uniseg_cli.weights.install import install

    if force or store.installed_folder(entry.name) is None:
        _accept_license_once(entry, accept_license, show=not (quiet and accept_license))
    installed = install(entry, device=pick_device(device), progress=not quiet, force=force)
    log = logging.getLogger("uniseg_cli")
    if installed.already:
        log.info("%s is already installed (use --force to download it again)", entry.name)
    elif installed.report is not None:
        log.info("%s: %d tensors, %s parameters, the published layout; logits of the stored model vs the checkpoint "
                 "on one patch: max |diff| = %.3g", entry.name, installed.report.tensors,
                 f"{installed.report.parameters:,}", installed.report.max_abs_diff)
    if installed.became_default:
        log.info("%s is now the default model: commands without --model use it", entry.name)
    print(installed.folder)


def _accept_license_once(entry: RegistryEntry, accept: bool, *, show: bool) -> None:
    """Show a licence not yet accepted and take the user's acceptance (flag, or y/N on a terminal)."""
    import sys

    from uniseg_cli.errors import UnisegError, UsageError
    from uniseg_cli.weights import store

    text = entry.license_text
    if text is None or store.license_acceptance(entry.name, text) is not None:
        return
    if not accept and not sys.stdin.isatty():
        raise UsageError(f"{entry.name}: its licence must be accepted first ({entry.license}): read it with "
                         f"`uniseg weights info {entry.name}`, then run `uniseg weights download {entry.name} "
                         "--accept-license`")
    if show:
        typer.echo(f"Licence of the {entry.name} weights:\n\n{text.strip()}\n", err=True)
    if not accept and not typer.confirm(f"Accept the licence of {entry.name}?", default=False, err=True):
        raise UnisegError(f"{entry.name}: licence not accepted; nothing was downloaded")
    store.accept_license(entry.name, text)


@app.command("default")
def default(
    model: Optional[str] = typer.Argument(None, help="The model to use when a command gets no --model: an installed or registry name, a folder, or a Hub name."),
    unset: bool = typer.Option(False, "--unset", help="Forget the default model."),
) -> None:
    """Show or set the default model (used when a command gets no --model).

    Precedence: --model, then the UNISEG_MODEL variable, then this default. The first successful
    `uniseg weights download` or `uniseg weights import --name` sets it when none is set.
    """
    from pathlib import Path

    from uniseg_cli.errors import UsageError
    from uniseg_cli.weights import store
    from uniseg_cli.weights.hub import resolve_model

    if unset and model is not None:
        raise UsageError("give a model or --unset, not both")
    if unset:
        store.set_default_model(None)
    elif model is not None:
        resolved = resolve_model(model)  # must resolve now (offline for installed models), not on first use
        spec = str(Path(model).expanduser().resolve()) if resolved.path == Path(model).expanduser() else model
        store.set_default_model(spec)
    current = store.default_model()
    if current is None:
        typer.echo("no default model (get one with `uniseg weights download uniseg-11task`)", err=True)
        return
    print(current.spec)
    typer.echo(f"(set by {current.origin})", err=True)


@app.command("info")
def info(model: Optional[str] = typer.Argument(None, help=MODEL_HELP + " Default: the default model."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout.")) -> None:
    """Show a model's configuration, tasks, parameter count, source and licence (in full where the
    model has one to accept); for a release not installed yet, its published files."""
    from uniseg_cli.weights.catalog import describe_model

    description = describe_model(model)
    if as_json:
        print(json.dumps(description, indent=2))
        return
    if not description["installed"]:
        release = description["release"]
        lines = [f"model:       {description['spec']} (not installed: `uniseg weights download {description['spec']}`)",
                 f"about:       {description['description']}",
                 f"source:      {release['homepage']}",
                 f"parameters:  {description['parameters']:,} in {release['tensors']} tensors",
                 "tasks:       " + ", ".join(description["tasks"])]
        lines += [f"file:        {f['name']} ({f['role']}), Google Drive id {f['gdrive_id']}, sha256 "
                  f"{f['sha256'] or 'not pinned'}" for f in release["files"]]
    else:
        arch = description["config"]["architecture"]
        lines = [
            f"model:       {description['spec']}",
            f"folder:      {description['path']}",
            f"source:      {description['source'] or '(not recorded)'}",
            f"parameters:  {description['parameters']:,}",
            f"patch:       {' x '.join(map(str, arch['patch_size']))}, features {description['stage_features']}, "
            f"{arch['num_classes']} outputs, inputs {'/'.join(map(str, arch['input_channels']))} channels",
            "tasks:       " + ", ".join(f"{t['id']} {t['key']}" for t in description["config"]["tasks"]),
        ]
    lines.append(f"licence:     {description['license'] or '(not stated)'}")
    if description.get("license_text"):
        lines += ["", description["license_text"].rstrip()]
    print("\n".join(lines))


@app.command("verify")
def verify(model: Optional[str] = typer.Argument(None, help=MODEL_HELP + " Default: the default model.")) -> None:
    """Re-hash a model's files: a registry model against its pinned sha256s, an installed one against
    the hashes recorded when it was installed (exit 1 if any differs)."""
    from uniseg_cli.errors import ModelFileError
    from uniseg_cli.weights.catalog import verify_model

    lines, changed = verify_model(model)
    for line in lines:
        print(line)
    if changed:
        raise ModelFileError(f"{', '.join(changed)} changed since the model was installed; reinstall it "
                             "(`uniseg weights download NAME --force`, or import it again)")


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
    from uniseg_cli.weights.catalog import push_model

    print(push_model(folder, repo, private=private, message=message))


@app.command("import")
def import_(
    checkpoint: Path = typer.Argument(..., help="The published nnU-Net v1 checkpoint, e.g. model_final_checkpoint.model."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Model folder to write (config.json + model.safetensors)."),
    name: Optional[str] = typer.Option(None, "--name", help="Instead of -o: install into your model store under NAME (usable as -m NAME; the default model if none is set)."),
    plans: Optional[Path] = typer.Option(None, "--plans", help="The checkpoint's .model.pkl plans, to cross-check the inferred configuration."),
    license: str = typer.Option("", "--license", help="Licence of the weights, recorded in config.json (the published UniSeg weights are non-commercial)."),
    device: str = typer.Option("auto", "--device", help=f"Where to run the agreement check: {DEVICE_HELP}."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
) -> None:
    """Convert a published UniSeg checkpoint into a safe model folder, once.

    The pickled checkpoint and plans are read through an allow-list (no code in them can run), the
    network configuration is inferred from the tensor shapes, and the written folder is reloaded and
    run on the same patch as the checkpoint to prove they agree. Prints the folder path on stdout.
    `uniseg weights download uniseg-11task` does all of this for the published weights.

    \b
    Examples:
      uniseg weights import model_final_checkpoint.model --plans model_final_checkpoint.model.pkl -o my-uniseg
      uniseg weights import model_final_checkpoint.model --name my-uniseg     into the store, as -m my-uniseg
    """
    import logging

    from uniseg_cli.devices import pick_device
    from uniseg_cli.errors import UsageError
    from uniseg_cli.model.checkpoint_import import import_checkpoint

    log = logging.getLogger("uniseg_cli")
    if (output is None) == (name is None):
        raise UsageError("give exactly one of --output/-o (a folder) or --name (your model store)")
    target = pick_device(device)
    if name is not None:
        from uniseg_cli.weights.install import import_to_store

        installed = import_to_store(checkpoint, name, plans=plans, device=target, license=license, force=force)
        report = installed.report
        assert report is not None
        if installed.became_default:
            log.info("%s is now the default model: commands without --model use it", name)
    else:
        from uniseg_cli.io.atomic import refuse_replacing_inputs

        refuse_replacing_inputs(output, (checkpoint, plans))
        output = output if output.name else output.resolve()  # "." and ".." name no folder to write beside
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
