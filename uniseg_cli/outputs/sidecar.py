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


def label_table(legend: Sequence[Any], *, label_map: str, model: str, task: str,
                regions: Sequence[Any] = ()) -> dict[str, Any]:
    """The table: each value of the map (``labels``) and, for region tasks, each region with the values
    it unites (``regions``: whole tumour = edema + core + enhancing), with names, colours and codes."""
    table = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "label_map": label_map, "model": model,
             "task": task, "background": 0, "labels": [_entry(label, value=label.value) for label in legend]}
    if regions:
        table["regions"] = [_entry(region, values=list(region.values)) for region in regions]
    return table


def _entry(structure: Any, **where: Any) -> dict[str, Any]:
    terms = structure.terms
    return {**where, "name": structure.name, "task": structure.task, "colour": list(terms.colour),
            "category": asdict(terms.category), "type": asdict(terms.type),
            **({"region": asdict(terms.region)} if terms.region is not None else {})}


def write_sidecar(path: Path, legend: Sequence[Any], *, label_map: Path, model: str, task: str,
                  regions: Sequence[Any] = ()) -> None:
    table = label_table(legend, label_map=label_map.name, model=model, task=task, regions=regions)
    path.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
