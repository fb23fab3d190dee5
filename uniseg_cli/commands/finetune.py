"""``uniseg finetune``: from a raw dataset folder to a fine-tuned model folder, evaluated."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from uniseg_cli.commands._options import (
    ACCEPT_IMPLAUSIBLE,
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


def finetune(
    dataset: Path = typer.Argument(..., metavar="DATASET", help="nnU-Net v2 or MSD dataset folder (with dataset.json)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Pretrained model: folder, installed or registry name, or Hub name (default: $UNISEG_MODEL, else `uniseg weights default`)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Model folder to write (default: <dataset name>-finetuned here)."),
    mode: str = typer.Option("downstream", "--mode", metavar="downstream|new-task", help="downstream: the paper's protocol (no prompt, new heads, one task). new-task: add the dataset as one more prompted task."),
    task_name: Optional[str] = typer.Option(None, "--task-name", help="Name of the dataset's task (default: the folder name without DatasetNNN_/TaskNN_)."),
    freeze_upstream: bool = typer.Option(False, "--freeze-upstream", help="new-task: train only the new task's weights; the model's other tasks keep their exact outputs."),
    freeze_encoder: int = typer.Option(0, "--freeze-encoder", min=0, metavar="K", help="Keep the pretrained encoder fixed for the first K epochs."),
    epochs: int = typer.Option(100, "--epochs", min=1, help="Epochs (the paper: 100)."),
    batches_per_task: int = typer.Option(250, "--batches-per-task", min=1, help="Batches per epoch (the paper: 250)."),
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    fold: str = FOLD,
    split_file: Optional[Path] = SPLIT_FILE,
    val_every: int = typer.Option(10, "--val-every", min=1, help="Validate every N epochs and at the end."),
    target_spacing: Optional[str] = typer.Option(None, "--target-spacing", metavar="Z,Y,X", help="Resample to this spacing (mm) instead of the dataset's median."),
    preprocessed: Optional[Path] = typer.Option(None, "--preprocessed", help="Where to keep the pre-processed dataset (default: <output>-preprocessed beside the output; reused on rerun)."),
    tolerance: float = typer.Option(1.0, "--tolerance", help="Surface Dice tolerance (mm) of the final evaluation."),
    tta: bool = typer.Option(True, "--tta/--no-tta", help="Mirroring in the final evaluation's predictions (default on, as predict)."),
    step: float = typer.Option(0.5, "--step", min=0.01, max=1.0, help="Tile step of the final evaluation's predictions, as a fraction of the patch (default 0.5, as predict)."),
    device: str = DEVICE,
    workers: int = typer.Option(2, "--workers", "-j", min=0, help="Worker processes for pre-processing and for data loading (0: data loading in this process)."),
    seed: int = SEED,
    precision: str = TRAIN_PRECISION,
    augment: bool = AUGMENT,
    mirror_axes: Optional[str] = MIRROR_AXES,
    resume: bool = RESUME,
    accept_implausible: bool = ACCEPT_IMPLAUSIBLE,
    quiet: bool = QUIET,
) -> None:
    """Fine-tune a pretrained model on a dataset: check, pre-process (cached), train, evaluate.

    The output is a model folder (`uniseg predict --model OUTPUT --task NAME`), with best/, the
    training log and state, and evaluation.json: Dice, HD95 and surface Dice of the held-out cases,
    segmented from their raw files with predict's pipeline.

    \b
    Examples:
      uniseg finetune ./Dataset501_Liver -o liver-ft                 from the default model
      uniseg finetune ./Task09_Spleen -m uniseg-11task --mode new-task --freeze-upstream -o with-spleen
    """
    from uniseg_cli.inference.allocator import tune_allocator

    tune_allocator(prefer="speed")  # this process only, see uniseg_cli/inference/allocator.py
    from uniseg_cli.inference.sliding_window import WindowOptions
    from uniseg_cli.training.finetune import finetune as run
    from uniseg_cli.training.trainer import TrainOptions

    if quiet:
        logging.getLogger("uniseg_cli").setLevel(logging.WARNING)
    check_fold(fold)
    spacing = parse_triple(target_spacing, "--target-spacing", float, "numbers (mm)")
    axes = parse_mirror_axes(mirror_axes)
    output = output or Path(f"{dataset.resolve().name}-finetuned")
    options = TrainOptions(epochs=epochs, batches_per_task=batches_per_task, batch_size=batch_size,
                           learning_rate=learning_rate, fold=fold, split_file=split_file, val_every=val_every,
                           device=device, workers=workers, seed=seed, resume=resume, progress=not quiet,
                           precision=precision, augment=augment, freeze_encoder_epochs=freeze_encoder)
    result = run(dataset, output, model=model, mode=mode, task_name=task_name, freeze_upstream=freeze_upstream,
                 preprocessed=preprocessed, target_spacing=spacing, workers=max(workers, 1), tolerance=tolerance,
                 mirror_axes=axes, accept_implausible=accept_implausible,
                 window=WindowOptions(step=step, mirror=tta),
                 options=options)
    if result.evaluation is not None:
        summary = result.evaluation["summary"]
        names = result.evaluation["labels"]
        logging.getLogger("uniseg_cli").info(
            "held-out Dice: %s", ", ".join(f"{names.get(k, k)} {v['dice']['mean']:.3f}" for k, v in summary.items()))
    print(output)
