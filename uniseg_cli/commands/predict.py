"""``uniseg predict``: segment scans with one task (or all that fit) and write label maps."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from uniseg_cli.commands._options import ACCEPT_IMPLAUSIBLE
from uniseg_cli.devices import DEVICE_HELP


def predict(
    inputs: list[str] = typer.Argument(..., metavar="INPUT...", help="Scan files (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd), DICOM series folders, folders of scans, comma-separated channel lists (t1.nii.gz,t1ce.nii.gz,…), or - to read one case per line from stdin."),
    task: str = typer.Option(..., "--task", "-t", help="Task key, alias or id (kidney, kidn, 1); a list (liver,kidney,spleen) or 'all' (every task that fits the input), merged into one map with the shared encoder run once per tile. See `uniseg tasks`."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model: a folder, an installed or registry name (`uniseg weights list`) or a Hub name owner/name[@revision]. Default: $UNISEG_MODEL, else `uniseg weights default` (set by the first `uniseg weights download`)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output file (one case) or folder. Default: <case>_<task>.nii.gz (or the first --output-format's ending) in the current folder."),
    output_format: str = typer.Option("nifti", "--output-format", "-f", metavar="nifti|dicom-seg|rtstruct|seg-nrrd", help="What to write, comma-separated for several (the first names -o): nifti (label map image; .nrrd/.mha by -o's ending), dicom-seg (DICOM Segmentation referencing the series), rtstruct (RT Structure Set), seg-nrrd (3D Slicer segmentation). dicom-seg and rtstruct need DICOM series inputs."),
    sidecar: bool = typer.Option(True, "--sidecar/--no-sidecar", help="Write the case record <name>.json beside the first output (label table: value -> name, task, colour, SNOMED CT codes; every file written with its size and SHA-256; the --json record) and a label table beside every NIfTI map. --skip-existing needs it."),
    split: bool = typer.Option(False, "--split", help="With a task list or 'all': one output per task (each in its own numbering) instead of the merged map."),
    statistics: bool = typer.Option(False, "--statistics", help="Add the input's intensity (channel 0, original units: HU for CT) inside each label to the --json record: mean, std, median, min, max, p5, p95, and its bounding box in mm (LPS)."),
    statistics_csv: Optional[Path] = typer.Option(None, "--statistics-csv", metavar="FILE", help="Also write the statistics as CSV, one row per case and label (implies --statistics)."),
    preview: bool = typer.Option(False, "--preview", help="Write <output>_preview.png: axial, coronal and sagittal slices through the labels, overlaid in their colours, with a legend."),
    preview_file: Optional[Path] = typer.Option(None, "--preview-file", metavar="FILE.png", help="The preview's file name for a single case (implies --preview)."),
    device: str = typer.Option("auto", "--device", help=f"{DEVICE_HELP}."),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="Mirroring test-time augmentation: the average over every flip of the axes the model was trained to mirror (its config.json mirror_axes: 8 flips for the published model, fewer or none for others; the log says which). Default on, as published; off is that many times faster."),
    step: Optional[float] = typer.Option(None, "--step", min=0.01, max=1.0, help="Tile step as a fraction of the patch size (default 0.5, as published: half-overlapping tiles); larger is faster."),
    fast: bool = typer.Option(False, "--fast", help="Preset: --no-tta --step 0.75 --precision fast (explicit options still win). Its speed and agreement with the default: docs/benchmarks.md."),
    precision: Optional[str] = typer.Option(None, "--precision", metavar="auto|fast|fp32|bf16|bf16-checked|fp16", help="Network precision. auto (default): fp16 autocast on CUDA (it gave fp32's label maps), fp32 elsewhere. fast (default with --fast): also bf16 channels-last on CPUs with bf16 matrix units (AMX, AVX-512 BF16; 2.3x fp32 per pass there, maps slightly different). bf16-checked: bf16 with the tiles that hold a near tie recomputed in fp32 (maps within Dice 0.998 of fp32's where measured; faster than fp32 only where most tiles hold none). fp32: the published computation (on CUDA with TF32 off). uniseg -v predict logs the choice and why."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Tiles per forward pass (more needs more memory; same result)."),
    save_probabilities: Optional[str] = typer.Option(None, "--save-probabilities", metavar="npz|nifti", help="Also write the task-class probabilities beside the label map: npz (float16) or nifti (float32)."),
    modality: Optional[str] = typer.Option(None, "--modality", help="With --task all on one-channel scans: CT or MR (default: CT if the scan has values below -500)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", metavar="SIZE", help="Refuse a case whose arrays (input, probability accumulators, label maps) would need more than SIZE (e.g. 4G), and resample the export in slabs that fit; the network's per-tile memory is not counted."),
    allow_gaps: bool = typer.Option(False, "--allow-gaps", help="Segment DICOM series with missing or unevenly spaced slices anyway, on an evenly spaced grid (labels beyond a gap are then shifted; refused by default)."),
    uncertainty: bool = typer.Option(False, "--uncertainty", help="Write <output>_uncertainty.nii.gz (normalised entropy of the class probabilities, 0 certain to 1) and, with TTA, <output>_disagreement.nii.gz (the part of it from the mirrored copies disagreeing), float32 on the scan's grid, at no extra network pass; add each label's confidence (mean probability, share below 0.75, a volume range) to the record. Definitions: docs/quality.md."),
    accept_implausible: bool = ACCEPT_IMPLAUSIBLE,
    fail_on: Optional[str] = typer.Option(None, "--fail-on", metavar="CODE,...", help="Count cases with these quality flags as failed (exit 1; their outputs are still written): missing, volume, border, fragmented, low_confidence (needs --uncertainty), input_override, or any."),
    keep_largest: Optional[str] = typer.Option(None, "--keep-largest", metavar="LABELS|all", help="Post-processing: keep only the largest connected component of these labels (by name, comma-separated; kidney keeps two); recorded in the record."),
    min_component_ml: Optional[float] = typer.Option(None, "--min-component-ml", metavar="ML", help="Post-processing: remove connected components smaller than ML millilitres from every label; recorded in the record."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per case on stdout."),
    shard: Optional[str] = typer.Option(None, "--shard", metavar="I/N|auto", help="Process every N-th case starting at I (sorted by case name), to split a batch across jobs; auto (or auto/N): I and N from a Slurm job array, a Kubernetes indexed Job or torchrun (docs/cohorts.md). Each shard writes its run report uniseg-run_shard-K-of-N.json."),
    skip_existing: bool = typer.Option(False, "--skip-existing", help="Skip cases whose outputs are all there as their case record lists them (resume an interrupted batch); a case with a missing, truncated or changed file is redone."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or log lines (errors still go to stderr)."),
) -> None:
    """Segment scans: pre-process as published, slide the network over each, write a label map.

    Multi-channel cases use nnU-Net naming (CASE_0000.nii.gz, CASE_0001.nii.gz, … in one folder or
    among the arguments) or one comma-separated argument in the task's channel order. Outputs keep
    the input's exact geometry (uint8). Exit code 0 if every case succeeded, 1 if some failed (the
    others are written), 2 for usage errors.

    \b
    Examples:
      uniseg predict scan.nii.gz --task kidney -o kidney.nii.gz                    the default model
      uniseg predict t1.nii.gz,t1ce.nii.gz,t2.nii.gz,flair.nii.gz --task brain_tumor -m uniseg-11task
      ls *.nii.gz | uniseg predict - --task liver -o out/ --json > volumes.jsonl
      uniseg predict scan.nii.gz --task kidney -m uniseg-demo --fast               bundled demo model
      uniseg predict dicom_series/ --task liver,spleen -f dicom-seg,nifti --statistics --json
      uniseg predict scan.nii.gz --task all -f seg-nrrd --preview                  3D Slicer + PNG
    """
    from uniseg_cli.inference.allocator import tune_allocator

    tune_allocator()  # before torch is imported: this process only, see uniseg_cli/inference/allocator.py
    from uniseg_cli.errors import UsageError
    from uniseg_cli.inference.batch import run_batch
    from uniseg_cli.inference.predictor import PROBABILITY_FORMATS
    from uniseg_cli.inference.runtime import PRECISIONS, parse_size
    from uniseg_cli.inference.sliding_window import WindowOptions
    from uniseg_cli.io.stdout import print_data
    from uniseg_cli.outputs.formats import OutputOptions, parse_formats
    from uniseg_cli.outputs.record import dumps
    from uniseg_cli.quality.flags import parse_fail_on

    if quiet:
        logging.getLogger("uniseg_cli").setLevel(logging.WARNING)
    if save_probabilities is not None and save_probabilities not in PROBABILITY_FORMATS:
        raise UsageError(f"--save-probabilities must be npz or nifti, got {save_probabilities!r}")
    if modality is not None and modality.upper() not in ("CT", "MR"):
        raise UsageError(f"--modality must be CT or MR, got {modality!r}")
    precision = ("fast" if fast else "auto") if precision is None else precision
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    tta = (not fast) if tta is None else tta
    step = (0.75 if fast else 0.5) if step is None else step
    if preview_file is not None and not preview_file.name.lower().endswith(".png"):
        raise UsageError(f"--preview-file {preview_file}: must end in .png")
    outputs = OutputOptions(formats=parse_formats(output_format), sidecar=sidecar,
                            statistics=statistics or statistics_csv is not None,
                            preview=preview or preview_file is not None, preview_path=preview_file, split=split,
                            uncertainty=uncertainty)
    stdin = sys.stdin if "-" in inputs else ()
    failures = run_batch(
        inputs, stdin, task=task, model=model, output=output, device=device,
        window=WindowOptions(step=step, mirror=tta, batch_size=batch_size, precision=precision),
        probabilities=save_probabilities, modality=modality, shard=shard, skip_existing=skip_existing,
        emit=(lambda result: print_data(dumps(result.to_json()))) if as_json else None,
        progress=not quiet, max_memory=None if max_memory is None else parse_size(max_memory), allow_gaps=allow_gaps,
        outputs=outputs, statistics_csv=statistics_csv, accept_implausible=accept_implausible,
        keep_largest=keep_largest, min_component_ml=min_component_ml, fail_on=parse_fail_on(fail_on),
    )
    if failures:
        raise typer.Exit(1)
