"""``uniseg train``: train a UniSeg model on a pre-processed folder (single process or torchrun)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from uniseg_cli.commands._options import (
    AUGMENT,
    BATCH_SIZE,
    DEVICE,
    FOLD,
    LEARNING_RATE,
    MIRROR_AXES,
    QUIET,
    RESUME,
    SEED,
    SPLIT_FILE,
    TRAIN_PRECISION,
    check_fold,
    parse_mirror_axes,
    parse_triple,
)


def train(
    data: Path = typer.Argument(..., metavar="PREPROCESSED", help="Folder written by `uniseg preprocess`."),
    output: Path = typer.Option(..., "--output", "-o", help="Model folder to write (usable by `uniseg predict --model`)."),
    preset: str = typer.Option("published", "--preset", metavar="published|small", help="Network size: published (patch 64x192x192, 32-320 features) or small (patch 32x64x64, 4-32 features: CPU smoke runs)."),
    patch_size: Optional[str] = typer.Option(None, "--patch-size", metavar="Z,Y,X", help="Override the preset's patch size."),
    base_features: Optional[int] = typer.Option(None, "--base-features", min=1, help="Override the preset's features of the first stage."),
    max_features: Optional[int] = typer.Option(None, "--max-features", min=1, help="Override the preset's largest feature count."),
    epochs: int = typer.Option(1000, "--epochs", min=1, help="Epochs (published: 1000)."),
    batches_per_task: int = typer.Option(50, "--batches-per-task", min=1, help="Batches per task per epoch (published: 50)."),
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    fold: str = FOLD,
    split_file: Optional[Path] = SPLIT_FILE,
    val_every: int = typer.Option(50, "--val-every", min=1, help="Validate (sliding window on the held-out cases) every N epochs and at the end."),
    device: str = DEVICE,
    workers: int = typer.Option(2, "--workers", "-j", min=0, help="Data-loading worker processes (0 = in the training process)."),
    seed: int = SEED,
    precision: str = TRAIN_PRECISION,
    augment: bool = AUGMENT,
    mirror_axes: Optional[str] = MIRROR_AXES,
    resume: bool = RESUME,
    quiet: bool = QUIET,
) -> None:
    """Train UniSeg with the published recipe: one task per batch, SGD 0.99, poly LR, Dice+CE.

    Writes OUTPUT/config.json + model.safetensors (final weights), OUTPUT/best/ (best validation),
    training_state.pt (for --resume), training_log.jsonl, training_curves.png and splits.json.
    Several GPUs or machines: torchrun --nproc_per_node N -m uniseg_cli train ...

    \b
    Examples:
      uniseg train prep/ -o my-model/
      uniseg train prep/ -o smoke/ --preset small --epochs 5 --batches-per-task 10 --device cpu
      torchrun --nproc_per_node 4 -m uniseg_cli train prep/ -o my-model/
    """
    from uniseg_cli.inference.allocator import tune_allocator

    tune_allocator(prefer="speed")  # this process only, see uniseg_cli/inference/allocator.py
    from uniseg_cli.data.training_cache import read_plan
    from uniseg_cli.training.trainer import TrainOptions, training_config
    from uniseg_cli.training.trainer import train as run_training

    if quiet:
        logging.getLogger("uniseg_cli").setLevel(logging.WARNING)
    check_fold(fold)
    patch = parse_triple(patch_size, "--patch-size", int, "integers")
    tasks = read_plan(data)
    axes = parse_mirror_axes(mirror_axes)
    config = None if resume else training_config(tasks, preset, patch_size=patch, base_features=base_features,
                                                 max_features=max_features, mirror_axes=axes)
    options = TrainOptions(epochs=epochs, batches_per_task=batches_per_task, batch_size=batch_size,
                           learning_rate=learning_rate, fold=fold, split_file=split_file, val_every=val_every,
                           device=device, workers=workers, seed=seed, resume=resume, augment=augment,
                           progress=not quiet, precision=precision)
    run_training(data, output, config=config, options=options, tasks=tasks)
