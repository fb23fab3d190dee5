"""``uniseg tasks``: the tasks a model segments, with the names that select them."""

from __future__ import annotations

import json
from typing import Optional

import typer

from uniseg_cli.tasks import UPSTREAM_TASKS, Task


def tasks(
    as_json: bool = typer.Option(False, "--json", help="Print the tasks as a JSON array on stdout."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="A model (folder, registry name or Hub name): list its tasks instead of the upstream ones."
    ),
) -> None:
    """List the segmentation tasks: id, key, aliases, input channels, labels and target spacing.

    Without --model, the 11 upstream tasks of the published UniSeg model. Any key, alias or id
    selects a task in `uniseg predict --task`.
    """
    listed = _model_tasks(model) if model is not None else UPSTREAM_TASKS
    if as_json:
        print(json.dumps([t.to_dict() for t in listed], indent=2))
        return
    _print_table(listed)


def _model_tasks(model: str) -> tuple[Task, ...]:
    from uniseg_cli.weights.hub import model_config

    return model_config(model).tasks


def _print_table(listed: tuple[Task, ...]) -> None:
    from rich.table import Table

    from uniseg_cli.io.stdout import data_console

    table = Table(title="UniSeg tasks", title_justify="left")
    for column in ("id", "key", "aliases", "input channels", "labels (1, 2, …)", "spacing z,y,x mm"):
        table.add_column(column, justify="right" if column == "id" else "left")
    for task in listed:
        channels = ", ".join(f"{c.name}" + (f" ({c.modality})" if c.modality != c.name else "") for c in task.channels)
        spacing = " × ".join(f"{s:g}" for s in task.target_spacing)
        table.add_row(str(task.id), task.key, ", ".join(task.aliases), channels, ", ".join(task.labels), spacing)
    data_console().print(table)
