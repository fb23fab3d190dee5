"""``uniseg evaluate``: Dice, HD95 and normalised surface Dice of predictions against references."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def evaluate(
    prediction: Path = typer.Argument(..., metavar="PRED", help="A label map, or a folder of them."),
    reference: Path = typer.Argument(..., metavar="REF", help="The reference label map, or a folder (matched by case name; CASE_<task> predictions match CASE)."),
    labels: Optional[str] = typer.Option(None, "--labels", metavar="1,2,...", help="Label values to score (default: every non-zero value in either map)."),
    regions: Optional[str] = typer.Option(None, "--regions", metavar="NAME=V,V;…", help="Score regions instead of labels: each the voxels holding any of its values, e.g. whole=1,2,3;core=2,3;enhancing=3 (BraTS)."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="In a folder of several tasks' maps (predict --split), score the CASE_<task> ones."),
    tolerance: float = typer.Option(1.0, "--tolerance", help="Normalised surface Dice tolerance in mm."),
    as_json: bool = typer.Option(False, "--json", help="Print per-case and summary metrics as one JSON object."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Also write one row per case and label (plus mean/std rows) to this CSV file."),
) -> None:
    """Score label maps: Dice, 95th-percentile Hausdorff distance (mm) and normalised surface Dice.

    Distances use the images' spacing. Both masks empty: Dice 1, NSD 1, HD95 0; one empty: Dice 0,
    NSD 0, HD95 undefined (null, left out of the mean; n counts the cases that have it).

    \b
    Examples:
      uniseg evaluate pred/ labelsTs/ --json > metrics.json
      uniseg evaluate case1_kidney.nii.gz case1.nii.gz --labels 1,2 --tolerance 2
      uniseg evaluate pred/ labelsTs/ --regions 'whole=1,2,3;core=2,3;enhancing=3'
    """
    from uniseg_cli.errors import UsageError
    from uniseg_cli.io.atomic import write_text
    from uniseg_cli.metrics import METRICS, parse_regions, to_csv
    from uniseg_cli.metrics import evaluate as run

    chosen = None
    if labels is not None:
        try:
            chosen = [int(v) for v in labels.split(",") if v.strip()]
        except ValueError:
            raise UsageError(f"--labels must be integers like 1,2,3, got {labels!r}") from None
    if regions is not None and chosen is not None:
        raise UsageError("give --labels or --regions, not both")
    result = run(prediction, reference, labels=chosen, tolerance=tolerance, task=task,
                 regions=parse_regions(regions) if regions is not None else ())
    if csv_path is not None:
        write_text(csv_path, to_csv(result))
    if as_json:
        print(json.dumps(result))
        return
    unmatched = len(result["unmatched_predictions"])
    print(f"{len(result['cases'])} case(s); NSD tolerance {tolerance:g} mm"
          + (f"; {unmatched} prediction(s) without a reference, not scored" if unmatched else ""))
    width = max([6] + [len(label) for label in result["summary"]])
    print(f"{'label':>{width}} " + " ".join(f"{m + ' mean':>11} {m + ' std':>10} {'n':>3}" for m in METRICS))
    for label, metrics in result["summary"].items():
        cells = []
        for m in METRICS:
            s = metrics[m]
            cells.append(f"{_fmt(s['mean']):>11} {_fmt(s['std']):>10} {s['n']:>3}")
        print(f"{label:>{width}} " + " ".join(cells))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
