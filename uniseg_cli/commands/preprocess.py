"""``uniseg preprocess``: check raw datasets and turn them into memory-mappable training arrays."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from uniseg_cli.commands._options import ACCEPT_IMPLAUSIBLE, parse_triple


def preprocess(
    datasets: list[str] = typer.Option(..., "--dataset", "-d", metavar="[TASK=]FOLDER", help="A raw dataset (nnU-Net v2 or MSD folder with dataset.json). TASK is a known task (kidney, brain_tumor, … : its channels, spacing and classes) or the name of a new task made from the dataset (its labels, channels and median spacing); default: named after the folder. Repeat for several tasks."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write (plan.json, one sub-folder per task). Rerunning with the same datasets resumes."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Take the known tasks from this model's config (default: the 11 published tasks)."),
    target_spacing: Optional[str] = typer.Option(None, "--target-spacing", metavar="Z,Y,X", help="Resample every task to this spacing in mm instead of its own (known task) or the dataset's median (new task)."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", min=1, help="Cases processed in parallel (default: the number of CPU cores)."),
    accept_implausible: bool = ACCEPT_IMPLAUSIBLE,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or log lines."),
) -> None:
    """Check datasets and pre-process them for training, exactly as predict pre-processes scans.

    Every file of every case is read and checked first (missing files, label grid, undeclared label
    values, channel count, NaN); then each case is reoriented, cropped, resampled to its task's
    spacing and normalised, and written as .npy (image, labels) plus a .json of its geometry.
    Foreground labels are taken in dataset.json's order as the task's classes 1, 2, …

    \b
    Examples:
      uniseg preprocess -d kidney=./Dataset001_KiTS -d ./Task03_Liver -o prep/
      uniseg train prep/ -o my-model/
    """
    from uniseg_cli.data.training_cache import preprocess_datasets
    from uniseg_cli.tasks import UPSTREAM_TASKS

    if quiet:
        logging.getLogger("uniseg_cli").setLevel(logging.WARNING)
    known = UPSTREAM_TASKS
    if model is not None:
        from uniseg_cli.weights.hub import model_config

        known = model_config(model).tasks
    spacing = parse_triple(target_spacing, "--target-spacing", float, "numbers (mm)")
    tasks = preprocess_datasets(datasets, output, known=known, workers=workers, progress=not quiet,
                                target_spacing=spacing, accept_implausible=accept_implausible)
    for data in tasks:
        logging.getLogger("uniseg_cli").info("%s: %d case(s) in %s", data.task.key, len(data.cases), data.folder)
