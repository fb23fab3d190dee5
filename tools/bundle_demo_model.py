"""Copy the demo model built by tools/build_demo_model.py into the package and register it.

    python tools/bundle_demo_model.py WORK_FOLDER

Writes weights/uniseg-demo/ (config.json with the licence set, model.safetensors unchanged,
README.md model card with the training record and the held-out Dice from WORK_FOLDER/held_out.json) and
the registry entry ``uniseg-demo`` with the files' sha256.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from safetensors import safe_open  # noqa: E402

from uniseg_cli.config import UniSegConfig  # noqa: E402
from uniseg_cli.weights.hub import sha256_of  # noqa: E402

NAME = "uniseg-demo"
LICENSE = ("Apache-2.0 (weights trained by the uniseg developers on Apache-2.0 example scans; a demonstration "
           "model, not for clinical or research use)")


def _rows(config: UniSegConfig, results: dict) -> list[str]:
    """Table rows (task, case, label, Dice, HD95, voxels) of a ``{task/case: {value: scores}}`` file."""
    rows = []
    for key, labels in results.items():
        task, case = key.split("/")
        names = next(t for t in config.tasks if t.key == task).labels
        for value, scores in labels.items():
            hd95 = "–" if scores["hd95"] is None else f"{scores['hd95']:.1f}"
            rows.append(f"| {task} | {case} | {names[int(value) - 1]} | {scores['dice']:.3f} | {hd95} | "
                        f"{scores['reference_voxels']} | {scores['predicted_voxels']} |")
    return rows


def main() -> int:
    work = Path(sys.argv[1])
    target = ROOT / "weights" / NAME
    target.mkdir(parents=True, exist_ok=True)
    config = UniSegConfig.from_json_file(work / "model" / "config.json").with_changes(
        license=LICENSE,
        source="uniseg train (tools/build_demo_model.py) on TotalSegmentator's example CT and one TCGA glioma case; "
               "see README.md")
    (target / "config.json").write_text(config.to_json(), encoding="utf-8")
    shutil.copyfile(work / "model" / "model.safetensors", target / "model.safetensors")
    log = [json.loads(line) for line in (work / "model" / "training_log.jsonl").read_text().splitlines()]
    epochs = [r for r in log if "epoch" in r and "event" not in r]
    rows = _rows(config, json.loads((work / "held_out.json").read_text()))
    training_fit = json.loads((work / "training_fit.json").read_text())
    fit_rows = _rows(config, training_fit)
    augmented = config.mirror_axes != ()
    ct_both = any(key.endswith("/totalseg_dicom_ct") for key in training_fit)
    minutes = sum(r["seconds"] for r in epochs) / 60
    with safe_open(str(target / "model.safetensors"), framework="np") as f:
        parameters = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    card = f"""# uniseg-demo — a demonstration model

**A demonstration model, not a medical device and not a research result.** It exists so that
`uniseg predict` runs offline on a fresh install and the whole toolchain (`preprocess`, `train`, `predict`,
`evaluate`, `finetune`, `export`) can be tried in minutes on a CPU. {'It fits the scans it was trained on and little else' if not augmented else 'Its segmentations are rough'}. For
real use, take the published UniSeg weights (`uniseg weights download uniseg-11task`) or train your own.

## What it is

A UniSeg network in the `small` configuration (patch 32×64×64) with features
{', '.join(map(str, config.stage_features))} ({parameters:,} parameters) and four prompted tasks, all resampled
to 3 mm isotropic:

| task | input | labels |
|---|---|---|
""" + "\n".join(f"| `{t.key}` | {', '.join(c.name for c in t.channels)} | {', '.join(t.labels)} |" for t in config.tasks) + f"""

## Exactly what it was trained on

Built with `python tools/build_demo_model.py WORK` (which calls `uniseg preprocess` and `uniseg train`):

- CT tasks: {'two abdominal CTs, the two the package ships in `tests/data`: ' if ct_both else 'one abdominal CT, '}TotalSegmentator's `example_ct.nii.gz` (122×101×112
  at 3 mm; `tests/data/example_ct.nii.gz`){" and its DICOM example CT (another patient, 512×512×20 at 0.98×0.98×2 mm, upper abdomen, no kidneys; `tests/data/example_ct_dicom`)" if ct_both else ''}, with
  TotalSegmentator's *model-generated* label maps as the target (liver = id 5, kidney = ids 2+3, spleen = id
  1). Apache-2.0.
- Brain tumour: one glioma case (TCGA-FG-6692, T1/T1ce/T2/FLAIR, skull-stripped, 1 mm, from the
  BrainLesion tutorials, Apache-2.0 repository; images from TCIA TCGA-LGG) with the majority vote of five
  BraTS algorithms as the target, mapped edema 2 → 1, necrosis/non-enhancing 1 → 2, enhancing 4 → 3.
- `uniseg train --preset small --base-features {config.base_features} --max-features {config.max_features}{'' if augmented else ' --no-augment'} --epochs {len(epochs)} --batches-per-task 50`
  on 2 CPU cores (AMD EPYC, {epochs[-1].get('precision', 'fp32')} training steps): {len(epochs)} epochs × {len(config.tasks)} tasks × 50 batches of 2
  patches, the published recipe otherwise (Dice + CE, deep supervision, SGD 0.99, poly lr from 0.01){'' if augmented else
  ', but without augmentation: a demonstration model is meant to fit the scans it shows, and with rotations, scaling and mirroring this network does not fit even those in minutes. Having seen no mirrored patch, its config records no mirror axes, so mirroring TTA does not apply to it'}. {minutes:.0f} minutes
  of training epochs (validation not counted). Final weights (training loss {epochs[-1]['loss']:.3f}).

## How well it fits what it was trained on

`uniseg predict` (default settings) and `uniseg evaluate` on the training cases themselves, against the same
label maps it was trained on:

| task | training case | label | Dice | HD95 (mm) | reference voxels | predicted voxels |
|---|---|---|---|---|---|---|
""" + "\n".join(fit_rows) + f"""

## How good it is, on cases it was not trained on

`uniseg predict` (default settings: step 0.5, TTA where the model allows it) and `uniseg evaluate` on the held-out cases:
{'the second glioma case TCGA-DU-7294 (which has no enhancing tumour in its fused map); no CT is held out: both Apache-2.0 CTs at hand are its training data' if ct_both else "TotalSegmentator's DICOM example CT (a different patient, 512×512×20 at 0.98×0.98×2 mm, upper abdomen, no kidneys in it; target again TotalSegmentator's model output) and the second glioma case TCGA-DU-7294 (which has no enhancing tumour in its fused map)"}.
One case{'' if ct_both else ' per task'}: these numbers show the model runs, not how well it generalises.{'' if augmented else ' Trained on one or two scans per task without augmentation, it does not generalise: on scans it has not seen it finds next to nothing.'}

| task | held-out case | label | Dice | HD95 (mm) | reference voxels | predicted voxels |
|---|---|---|---|---|---|---|
""" + "\n".join(rows) + f"""

(An empty reference and an empty prediction count as Dice 1 by `uniseg evaluate`'s convention.) It was not
evaluated on anything else.

## Licence

{LICENSE}. The training scans: TotalSegmentator repository (Apache-2.0) and BrainLesion/tutorials
(Apache-2.0; TCIA TCGA-LGG images).
"""
    (target / "README.md").write_text(card, encoding="utf-8")
    registry_path = ROOT / "weights" / "registry.json"
    registry = json.loads(registry_path.read_text())
    registry["models"][NAME] = {
        "description": "demonstration model bundled for offline use: liver, kidney, spleen (CT), brain tumour (4 MR)",
        "path": NAME,
        "files": {n: sha256_of(target / n) for n in ("config.json", "model.safetensors")},
        "tasks": [t.key for t in config.tasks],
        "license": LICENSE,
    }
    registry_path.write_text(json.dumps(registry, indent=2) + "\n")
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
