"""Writing a case's prediction: the export phase (nnU-Net v2's ``export_prediction``).

``export_case`` writes exactly the files the case's plan lists, each map through its format's writer
(``uniseg_cli.outputs.formats.FORMATS``), all to temporary names, then publishes them together with
the case record last (``uniseg_cli.io.atomic.atomic_files``): either every output of the case appears,
or, if any writer or move fails, none does and earlier outputs stay as they were.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from uniseg_cli.inference.phases import CaseResult, Label, Prediction, PreparedCase
from uniseg_cli.io.atomic import AtomicFiles, atomic_files, make_folder
from uniseg_cli.io.images import Geometry, write_array
from uniseg_cli.labels import Structure
from uniseg_cli.outputs.formats import FORMATS, OUTPUT_MARK, MapToWrite, OutputOptions
from uniseg_cli.outputs.plan import UNCERTAINTY_ROLES, CasePlan, MapPlan
from uniseg_cli.outputs.record import RECORD_VERSION, dumps, file_entry
from uniseg_cli.outputs.sidecar import label_table, write_sidecar
from uniseg_cli.outputs.statistics import label_intensities, mask_intensities
from uniseg_cli.quality.confidence import combine, label_confidence, normalised_entropy
from uniseg_cli.quality.flags import MapGeometry, case_flags, structure_flags


def export_case(prepared: PreparedCase, prediction: Prediction, *, model: str, device: str,
                options: OutputOptions, postprocessing: dict[str, Any] | None = None) -> CaseResult:
    """Write every file of ``prepared.plan``; returns the case's ``--json`` record, with each label's and
    region's quality flags (and, with ``--uncertainty``, confidence) and the case's flags."""
    plan, geometry, case = prepared.plan, prepared.geometry, prepared.case
    for folder in dict.fromkeys(f.path.parent for f in plan.files):
        make_folder(folder)
    roles = {f.path: f.role for f in plan.files}
    written: dict[str, str] = {}
    labels: list[dict[str, Any]] = []
    regions: list[dict[str, Any]] = []
    with atomic_files() as files:
        maps = _maps(plan, prediction)
        for map_plan, label_map, legend, map_regions in maps:
            key = map_plan.task or prepared.key
            item = MapToWrite(label_map, legend, geometry, model, key, map_regions)
            prefix = f"{map_plan.task}:" if map_plan.task else ""
            for fmt, path in map_plan.files.items():
                writer = FORMATS[fmt]
                writer.write(files.add(path, suffix=writer.ending_of(path) or writer.ending), item)
                written[prefix + fmt] = str(path)
            if map_plan.label_table is not None:
                write_sidecar(files.add(map_plan.label_table, suffix=".json"), legend,
                              label_map=map_plan.files["nifti"], model=model, task=key, regions=map_regions)
                written[prefix + "sidecar"] = str(map_plan.label_table)
            quality = _Quality(label_map, geometry, prediction, options, split=map_plan.task is not None)
            labels += _label_records(label_map, legend, geometry, prepared.intensity, options,
                                     map_plan.primary if map_plan.task else None, quality)
            regions += _region_records(label_map, map_regions, geometry, prepared.intensity, options,
                                       map_plan.primary if map_plan.task else None, quality)
        if plan.preview is not None:
            from uniseg_cli.outputs.preview import write_preview

            write_preview(files.add(plan.preview, suffix=".png"), prepared.intensity, prediction.labels,
                          prediction.legend, geometry, title=f"{case.name}: {prepared.key} ({model})",
                          is_ct=prepared.inputs.groups[0][0][0].channels[0].modality.upper() == "CT")
            written["preview"] = str(plan.preview)
        if plan.probabilities is not None:
            _write_probabilities(plan.probabilities, prediction, geometry, into=files)
        if plan.uncertainty:
            volumes = uncertainty_maps(prediction, disagreement=len(plan.uncertainty) > 1)
            for path, role, volume in zip(plan.uncertainty, UNCERTAINTY_ROLES, volumes):
                write_array(path, volume, geometry, into=files, description=f"{OUTPUT_MARK} {role}")
                written[role] = str(path)
        primary = plan.primary
        if plan.record is not None:  # the first map's label table, holding the case record
            written[(f"{plan.maps[0].task}:" if plan.maps[0].task else "") + "sidecar"] = str(plan.record)
        # with --split every task's map is listed (the first too); otherwise the map is ``output``
        extra = {k: v for k, v in written.items() if options.split or v != str(primary)}
        result = CaseResult.of(case, prepared.key, output=str(primary), labels=labels,
                               seconds=round(time.perf_counter() - prepared.started, 3), device=device,
                               probabilities=str(plan.probabilities) if plan.probabilities else None,
                               outputs=extra or None, regions=regions or None,
                               flags=case_flags(labels + regions, prepared.inputs.accepted),
                               postprocessing=postprocessing)
        if plan.record is not None:
            _write_record(files, plan, roles, prediction_legend=maps[0][2], regions=maps[0][3], model=model,
                          result=result)
    return result


def _write_record(files: AtomicFiles, plan: CasePlan, roles: dict[Path, str], *, prediction_legend: list[Label],
                  regions: list[Structure], model: str, result: CaseResult) -> None:
    """The case record (``uniseg_cli.outputs.record``), from the temporary files about to be published."""
    record = plan.record
    assert record is not None
    listed = dict(file_entry(roles.get(dest, "file"), dest, tmp, record) for tmp, dest in files.pending)
    first = plan.maps[0]
    table = label_table(prediction_legend, label_map=first.files.get("nifti", first.primary).name, model=model,
                        task=first.task or plan.key, regions=regions)
    table.update(version=RECORD_VERSION, case=plan.case.name, inputs=[str(p) for p in plan.case.channels],
                 files=listed, result=result.to_json())
    files.add(record, suffix=".json").write_text(dumps(table, indent=2) + "\n", encoding="utf-8")


def _maps(plan: CasePlan, prediction: Prediction) -> list[tuple[MapPlan, np.ndarray, list[Label], list[Structure]]]:
    """(plan, label map, legend, regions) of each map: the merged one, or with ``--split`` each task's in
    its own numbering 1…n."""
    if plan.maps[0].task is None:
        return [(plan.maps[0], prediction.labels, prediction.legend, prediction.regions)]
    maps = []
    for map_plan in plan.maps:
        own = [label for label in prediction.legend if label.task == map_plan.task]
        renumber = {label.value: i for i, label in enumerate(own, start=1)}
        legend = [Label(renumber[label.value], label.name, label.task) for label in own]
        regions = [replace(r, values=tuple(renumber[v] for v in r.values)) for r in prediction.regions
                   if r.task == map_plan.task]
        maps.append((map_plan, prediction.tasks[map_plan.task], legend, regions))  # type: ignore[index]
    return maps


def _write_probabilities(path: Path, prediction: Prediction, geometry: Geometry, *, into: AtomicFiles) -> None:
    """float16 ``.npz`` (one array per task key, classes first) or float32 NIfTI (NIfTI has no float16)."""
    if path.name.endswith(".npz"):
        np.savez_compressed(into.add(path, suffix=".npz"), **prediction.probabilities)
        return
    stacked = np.concatenate(list(prediction.probabilities.values())).astype(np.float32)
    write_array(path, stacked, geometry, into=into, description=OUTPUT_MARK + " probabilities")


class _Quality:
    """Confidence and flags of the structures of one written map (``uniseg_cli.quality``)."""

    def __init__(self, label_map: np.ndarray, geometry: Geometry, prediction: Prediction, options: OutputOptions, *,
                 split: bool) -> None:
        self.map, self.prediction, self.split = label_map, prediction, split
        self.voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
        self.where = MapGeometry(label_map, geometry.array_axis_world())
        self.confident = options.uncertainty and bool(prediction.probabilities)

    def confidence(self, structure: Structure) -> dict[str, Any] | None:
        """``structure`` (values in this map's numbering) against its own probability map."""
        if not self.confident or structure.task not in self.prediction.probabilities:
            return None
        offset = 0 if self.split else self.prediction.offsets.get(structure.task, 0)
        own = replace(structure, values=tuple(v - offset for v in structure.values))
        channel = self.prediction.managers[structure.task].channel(own)
        probability = self.prediction.probabilities[structure.task][channel]
        return label_confidence(np.isin(self.map, structure.values), probability, self.voxel_ml)

    def annotate(self, record: dict[str, Any], structure: Structure) -> None:
        confidence = self.confidence(structure)
        if confidence is not None:
            record["confidence"] = confidence
        record["flags"] = structure_flags(structure.name, structure.values, record["voxels"], record["volume_ml"],
                                          self.where, confidence)


def _label_records(label_map: np.ndarray, legend: list[Label], geometry: Geometry, intensity: np.ndarray | None,
                   options: OutputOptions, path: Path | None, quality: _Quality) -> list[dict[str, Any]]:
    records = label_statistics(Prediction(label_map, legend), geometry)
    for record, label in zip(records, legend):
        quality.annotate(record, Structure(label.task, label.name, (label.value,)))
    if options.statistics and intensity is not None:
        stats = label_intensities(intensity, label_map, geometry, [r["value"] for r in records])
        for record in records:
            record["statistics"] = stats[record["value"]]
            if stats[record["value"]] is None:
                record["statistics_reason"] = "the label is empty"
    if path is not None:
        for record in records:
            record["output"] = str(path)
    return records


def _region_records(label_map: np.ndarray, regions: list[Structure], geometry: Geometry,
                    intensity: np.ndarray | None, options: OutputOptions, path: Path | None,
                    quality: _Quality) -> list[dict[str, Any]]:
    """A region task's regions, each the union of its classes (whole tumour = every class it holds):
    voxels, volume and, with ``--statistics``, the intensities inside."""
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    counts = np.bincount(label_map.ravel(), minlength=256)
    records = []
    for region in regions:
        voxels = int(counts[list(region.values)].sum())
        record: dict[str, Any] = {"name": region.name, "task": region.task, "values": list(region.values),
                                  "voxels": voxels, "volume_ml": round(voxels * voxel_ml, 3)}
        quality.annotate(record, region)
        if options.statistics and intensity is not None:
            record["statistics"] = mask_intensities(intensity, np.isin(label_map, region.values), geometry)
            if record["statistics"] is None:
                record["statistics_reason"] = "the region is empty"
        if path is not None:
            record["output"] = str(path)
        records.append(record)
    return records


def uncertainty_maps(prediction: Prediction, *, disagreement: bool) -> list[np.ndarray]:
    """The uncertainty map and, with ``disagreement``, the TTA disagreement map (float32, the scan's grid;
    definitions in ``uniseg_cli.quality.confidence``); several tasks: the largest value per voxel."""
    entropies, gaps = [], []
    for key, probabilities in prediction.probabilities.items():
        entropy = normalised_entropy(probabilities, sigmoid=prediction.managers[key].has_regions)
        entropies.append(entropy)
        if disagreement:
            gaps.append(np.clip(entropy - prediction.flip_entropy[key].astype(np.float32), 0.0, 1.0))
    return [combine(entropies)] + ([combine(gaps)] if disagreement else [])


def label_statistics(prediction: Prediction, geometry: Geometry) -> list[dict[str, Any]]:
    """Voxel count and volume (mL) of every label of the legend, zeros included."""
    counts = np.bincount(prediction.labels.ravel(), minlength=256)
    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    return [{"value": label.value, "name": label.name, "task": label.task, "voxels": int(counts[label.value]),
             "volume_ml": round(int(counts[label.value]) * voxel_ml, 3)} for label in prediction.legend]
