"""The label table beside a label map image: ``<name>.json``, value → name, task, colour and codes.

A NIfTI file holds bare integers; this file says what they mean, in a form scripts and viewers'
importers read without uniseg (the format is documented in docs/predict.md).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

SIDECAR_FORMAT = "uniseg-label-table"
SIDECAR_VERSION = 2


def label_table(legend: Sequence[Any], *, label_map: str, model: str, task: str) -> dict[str, Any]:
    labels = []
    for label in legend:
        terms = label.terms
        labels.append({"value": label.value, "name": label.name, "task": label.task, "colour": list(terms.colour),
                       "category": asdict(terms.category), "type": asdict(terms.type),
                       **({"region": asdict(terms.region)} if terms.region is not None else {})})
    return {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "label_map": label_map, "model": model,
            "task": task, "background": 0, "labels": labels}


def write_sidecar(path: Path, legend: Sequence[Any], *, label_map: Path, model: str, task: str) -> None:
    table = label_table(legend, label_map=label_map.name, model=model, task=task)
    path.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
