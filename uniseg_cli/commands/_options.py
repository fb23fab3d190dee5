"""Options and option parsing shared by several commands: defined once, so that `train` and
`finetune` (and every command with a device) spell, default and document them the same way."""

from __future__ import annotations

from typing import Callable, TypeVar

import typer

from uniseg_cli.devices import DEVICE_HELP
from uniseg_cli.errors import UsageError

DEVICE = typer.Option("auto", "--device", help=f"{DEVICE_HELP}.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar or log lines (errors still print).")
ACCEPT_IMPLAUSIBLE = typer.Option(
    False, "--accept-implausible",
    help="Use scans that fail the input checks anyway (a CT without air in HU or with a +1024 offset, an MR given as "
         "CT or a CT as MR, a constant channel, two identical channels, a DICOM Modality other than the channel's): "
         "each finding is logged as a warning (predict: and flagged input_override in the record). docs/quality.md.")

# Training (train and finetune)
BATCH_SIZE = typer.Option(2, "--batch-size", min=1, help="Patches per batch (published: 2).")
LEARNING_RATE = typer.Option(1e-2, "--lr", min=0.0, help="Initial learning rate, poly decay (published: 0.01).")
FOLD = typer.Option("0", "--fold", help="Cross-validation fold: 0-4 of nnU-Net's split (seed 12345), a fold of "
                                        "--split-file, or 'all' (train on every case, no validation).")
SPLIT_FILE = typer.Option(None, "--split-file", help="JSON {task: [{train: [...], val: [...]}, ...]}, or nnU-Net's "
                                                     "splits_final.json list for one task.")
SEED = typer.Option(0, "--seed", help="Seed of new weights and of every batch.")
TRAIN_PRECISION = typer.Option(
    "auto", "--precision", metavar="auto|fp32|bf16|fp16",
    help="Autocast of the training steps. auto: fp16 with a gradient scaler on CUDA (the published recipe), bf16 on "
         "CPUs with native bf16 instructions (about 3x faster there), else fp32.")
AUGMENT = typer.Option(True, "--augment/--no-augment",
                       help="nnU-Net moreDA augmentation on the training device (without it, no mirroring and no "
                            "mirroring TTA).")
MIRROR_AXES = typer.Option(
    None, "--mirror-axes", metavar="z,y,x|none",
    help="Axes that training mirrors and that TTA then flips (recorded in config.json; nnU-Net: all three). Leave "
         "out x when labels are left/right structures.")
RESUME = typer.Option(False, "--resume", help="Continue the run in OUTPUT from its last finished epoch.")


def check_fold(fold: str) -> str:
    if fold != "all" and not fold.isdigit():
        raise UsageError(f"--fold must be a number or 'all', got {fold!r}")
    return fold

def parse_mirror_axes(text: str | None) -> tuple[int, ...] | None:
    """``"z,y,x"``, a subset such as ``"z,y"``, or ``"none"`` → array axes (0, 1, 2); None when not given."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    names = [n.strip().lower() for n in text.split(",")]
    if not names or any(n not in "zyx" or not n for n in names) or len(set(names)) != len(names):
        raise UsageError(f"--mirror-axes must be axes among z, y, x (comma-separated) or none, got {text!r}")
    return tuple(sorted("zyx".index(n) for n in names))


N = TypeVar("N", int, float)


def parse_triple(text: str | None, option: str, kind: Callable[[str], N], what: str) -> tuple[N, N, N] | None:
    """``"Z,Y,X"`` as three positive numbers, or None when the option was not given."""
    if text is None:
        return None
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) <= 0:
        raise UsageError(f"{option} must be three positive {what} Z,Y,X, got {text!r}")
    return values  # type: ignore[return-value]
