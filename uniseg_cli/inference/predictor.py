"""The predictor: load a model once, then segment files, cases or arrays as often as needed.

``Segmenter`` holds the run options (like nnU-Net v2's ``nnUNetPredictor``); each case is read,
pre-processed per task spacing, run through the sliding window (the encoder shared by all asked
tasks), resampled back, put into the input's grid and written atomically.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uniseg_cli.data.preprocessing import EXPORT_SLAB_BYTES, CropInfo, labels_from_probabilities, preprocess, uncrop
from uniseg_cli.devices import pick_device
from uniseg_cli.errors import UnisegError, UsageError
from uniseg_cli.inference.cases import Case, case_name, group_channel_files, output_path
from uniseg_cli.inference.phases import CaseResult, Label, NetworkInputs, Prediction, PreparedCase
from uniseg_cli.inference.runtime import resolve_precision
from uniseg_cli.inference.sliding_window import WindowOptions, heads, sliding_window
from uniseg_cli.io.images import read_channels
from uniseg_cli.labels import Structure
from uniseg_cli.model.files import load_model
from uniseg_cli.model.network import UniSeg
from uniseg_cli.outputs.dicom import check_references
from uniseg_cli.outputs.export import export_case
from uniseg_cli.outputs.formats import OutputOptions
from uniseg_cli.outputs.plan import PROBABILITY_ENDINGS, CasePlan, check_plans, plan_case
from uniseg_cli.tasks import Task, resolve_task
from uniseg_cli.weights.hub import resolve_model

log = logging.getLogger(__name__)

ALL_TASKS = "all"
PROBABILITY_FORMATS = tuple(PROBABILITY_ENDINGS)
#: A one-channel scan whose minimum is below this is taken for CT (air is about -1000 HU).
CT_DETECTION_HU = -500.0


class Segmenter:
    """A loaded model with run options; ``predict_*`` methods segment one case at a time.

    model: a model spec (folder, registry name, ``owner/name[@revision]``; None = the default model)
        or a loaded ``UniSeg``.
    device: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or a device.
    window: sliding-window step, mirroring TTA, tiles per forward pass and precision (``auto``: fp16
        autocast on CUDA, fp32 elsewhere).
    max_memory: bytes the arrays of one case may take (network input, probability accumulators,
        export slabs; the network's own working memory per tile is not counted): a case that needs more
        is refused before its sliding window starts, and the export resampling works in slabs that fit.
    """

    def __init__(self, model: str | Path | UniSeg | None, *, device: str | torch.device = "auto",
                 window: WindowOptions = WindowOptions(), max_memory: int | None = None) -> None:
        if not 0 < window.step <= 1:
            raise UsageError(f"--step must be in (0, 1], got {window.step}")
        if window.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {window.batch_size}")
        self.device = pick_device(device) if isinstance(device, str) else torch.device(device)
        if isinstance(model, UniSeg):
            self.model, self.model_name = model.to(self.device).eval(), "(in memory)"
        else:
            resolved = resolve_model(model)
            self.model, self.model_name = load_model(resolved.path, device=self.device), resolved.spec
        self.window = replace(window, precision=resolve_precision(window.precision, self.device))
        self.max_memory = max_memory

    @property
    def tasks(self) -> tuple[Task, ...]:
        return self.model.config.tasks

    # ------------------------------------------------------------------------------------ tasks
    def select_tasks(self, spec: str, data: np.ndarray, *, source: str, modality: str | None = None) -> list[Task]:
        """The task(s) ``spec`` names for this input; refuses tasks whose channels do not fit."""
        channels = data.shape[0]
        if not _is_all(spec):
            chosen = self.subset(spec)
            for task in chosen:
                if len(task.channels) != channels:
                    wanted = ", ".join(c.name for c in task.channels)
                    raise UnisegError(f"{source}: task {task.key!r} takes {len(task.channels)} channel(s) ({wanted}); "
                                      f"the case has {channels}")
            return chosen
        fitting = [t for t in self.tasks if len(t.channels) == channels]
        if not fitting:
            raise UnisegError(f"{source}: no task of the model takes {channels} channel(s)")
        modalities = {t.modalities for t in fitting}
        if len(modalities) > 1:
            if modality is None:
                modality = "CT" if channels == 1 and float(data.min()) < CT_DETECTION_HU else "MR"
                log.info("%s: taking the scan for %s (pass --modality to say otherwise)", source, modality)
            fitting = [t for t in fitting if t.modalities[0].upper() == modality.upper()]
            if not fitting:
                raise UnisegError(f"{source}: no task of the model takes a {modality} scan with {channels} channel(s)")
        return fitting

    def subset(self, spec: str) -> list[Task]:
        """The tasks a ``liver,kidney,spleen`` list names (or ``liver+spleen``, the key results carry; or the
        one task a single name does), in the model's order, so that overlaps resolve as in ``all``: the
        later task wins."""
        named = {resolve_task(part, self.tasks).key for part in re.split(r"[,+]", spec) if part.strip()}
        if not named:
            raise UsageError(f"--task {spec!r}: no task named")
        return [t for t in self.tasks if t.key in named]

    def legend(self, tasks: Sequence[Task], *, merged: bool) -> tuple[list[Label], dict[str, int]]:
        """Label values of the written map: the task's own for one task; for ``all`` (even when only one
        task fits), the merged numbering of docs/pipeline.md §2 (each task's labels after all earlier tasks')."""
        if not merged:
            task = tasks[0]
            return [Label(s.values[0], s.name, task.key) for s in task.label_manager.classes], {task.key: 0}
        offsets, offset = {}, 0
        for task in self.tasks:
            offsets[task.key] = offset
            offset += len(task.labels)
        if offset > 255:
            raise UnisegError(f"the merged map would need {offset} labels; uint8 holds 255")
        legend = [Label(offsets[t.key] + s.values[0], s.name, t.key) for t in tasks for s in t.label_manager.classes]
        return legend, {t.key: offsets[t.key] for t in tasks}

    @staticmethod
    def regions(tasks: Sequence[Task], offsets: dict[str, int]) -> list[Structure]:
        """The regions of the region tasks among ``tasks``, their classes in the written map's numbering."""
        return [replace(r, values=tuple(v + offsets[t.key] for v in r.values))
                for t in tasks for r in t.label_manager.regions]

    # -------------------------------------------------------------------------------- inference
    def predict_array(self, data: np.ndarray, spacing: Sequence[float], task: str | Sequence[Task], *,
                      axis_world: Sequence[int] = (2, 1, 0), probabilities: bool = False, source: str = "array",
                      modality: str | None = None,
                      on_progress: Callable[[int, int], None] | None = None) -> Prediction:
        """Segment a ``(channels, z, y, x)`` (or ``(z, y, x)``) array with ``spacing`` (z, y, x) in mm.

        ``axis_world`` says which world axis each array axis runs along (0 L-R, 1 A-P, 2 S-I); the
        default is an axially stored scan.
        """
        inputs = self.prepare_array(data, spacing, task, axis_world=axis_world, source=source, modality=modality)
        return self.run(inputs, probabilities=probabilities, on_progress=on_progress)

    def prepare_array(self, data: np.ndarray, spacing: Sequence[float], task: str | Sequence[Task], *,
                      axis_world: Sequence[int] = (2, 1, 0), source: str = "array",
                      modality: str | None = None) -> NetworkInputs:
        """The CPU half of ``predict_array``: choose the tasks and pre-process once per spacing group."""
        data = np.asarray(data, dtype=np.float32)
        data = data[None] if data.ndim == 3 else data
        if data.ndim != 4:
            raise UnisegError(f"{source}: expected a (channels, z, y, x) array, got shape {data.shape}")
        if isinstance(task, str):
            tasks = self.select_tasks(task, data, source=source, modality=modality)
            merged, key = _is_all(task) or len(tasks) > 1, self.task_key(task)
        else:
            tasks, merged = list(task), len(task) > 1
            key = "+".join(t.key for t in tasks) if merged else tasks[0].key
        legend, offsets = self.legend(tasks, merged=merged)
        groups = [(group, *self._preprocess(data, tuple(spacing), axis_world, group[0], source=source))
                  for group in _group_by_preprocessing(tasks)]
        return NetworkInputs(key, tuple(data.shape[1:]), legend, offsets, groups,  # type: ignore[arg-type]
                             regions=self.regions(tasks, offsets))

    def _preprocess(self, data: np.ndarray, spacing: tuple[float, ...], axis_world: Sequence[int], task: Task, *,
                    source: str) -> tuple[torch.Tensor, CropInfo]:
        """Pre-processing on the GPU when the network runs on one (on the CPU if the GPU's memory is short);
        on the CPU otherwise (MPS has no float64 for the z-score statistics)."""
        arguments = (data, spacing, axis_world, task.channels, task.target_spacing)
        if self.device.type != "cuda":
            return preprocess(*arguments)
        try:
            return preprocess(*arguments, device=self.device)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            log.warning("%s: out of %s memory for pre-processing; doing it on the CPU", source, self.device)
            return preprocess(*arguments)

    def run(self, inputs: NetworkInputs, *, probabilities: bool = False, split: bool = False,
            on_progress: Callable[[int, int], None] | None = None) -> Prediction:
        """The network half: sliding window per group, probabilities back to the input grid, merged labels
        (and, with ``split``, each task's own map)."""
        single = sum(len(group) for group, _, _ in inputs.groups) == 1
        merged = None if single else np.zeros(inputs.shape, dtype=np.uint8)
        # Groups run in spacing order, not task order: where tasks overlap the later task must win, so
        # each voxel remembers the rank (1 + position in task order) of the task that labelled it.
        rank = {key: i + 1 for i, key in enumerate(inputs.offsets)}
        owner = None if single else np.zeros(inputs.shape, dtype=np.uint8)
        saved: dict[str, np.ndarray] = {}
        per_task: dict[str, np.ndarray] = {}
        for group, x, info in inputs.groups:
            slab_bytes = self._memory_budget(x, group, info, inputs.shape)
            tensor = x.to(self.device)
            with torch.inference_mode():
                outputs = self._window(tensor, heads(group), on_progress)
                for task_, probs in zip(group, outputs):
                    labels_t, p = labels_from_probabilities(probs, info, keep=probabilities, slab_bytes=slab_bytes,
                                                            region_order=task_.label_manager.region_order)
                    labels = uncrop(labels_t.cpu().numpy(), info)
                    if p is not None:
                        # outside the crop: background certain; no region there
                        saved[task_.key] = uncrop(p, info, fill_first=None if task_.label_manager.has_regions else 1)
                    del probs, labels_t, p
                    if split:
                        per_task[task_.key] = labels
                    offset = inputs.offsets[task_.key]
                    if single:  # one task: its map is the output (shifted only for the merged numbering)
                        merged = labels + np.uint8(offset) * (labels > 0) if offset else labels
                        continue
                    hit = (labels > 0) & (owner < rank[task_.key])
                    merged[hit] = labels[hit] + offset
                    owner[hit] = rank[task_.key]
        ordered = {key: per_task[key] for key in inputs.offsets if key in per_task}
        return Prediction(merged, inputs.legend, saved, ordered, regions=inputs.regions)

    def _memory_budget(self, x: torch.Tensor, group: Sequence[Task], info: CropInfo, shape: Sequence[int]) -> int:
        """The export slab size under ``max_memory``, after refusing a case whose arrays cannot fit."""
        if self.max_memory is None:
            return EXPORT_SLAB_BYTES
        padded = int(np.prod([max(s, p) for s, p in zip(x.shape[1:], self.model.config.patch_size)]))
        classes = sum(t.label_manager.num_outputs for t in group)
        needed = (x.numel() * x.element_size()              # the network input
                  + (classes + 1) * padded * 4              # float32 accumulators and weights
                  + 2 * int(np.prod(shape)))                # the uint8 label map and the merged map
        if needed > self.max_memory:
            raise UnisegError(
                f"needs about {_gib(needed)} for the input and the probabilities of {classes} classes on "
                f"{'×'.join(map(str, x.shape[1:]))} voxels at {'×'.join(f'{s:g}' for s in info.target_spacing)} mm, "
                f"more than --max-memory {_gib(self.max_memory)}")
        row = classes * int(np.prod(info.cropped_shape[1:])) * 4
        return max(row, min(EXPORT_SLAB_BYTES, self.max_memory - needed))

    def _window(self, tensor: torch.Tensor, tasks: list[tuple[int, int, bool]],
                on_progress: Callable[[int, int], None] | None) -> list[torch.Tensor]:
        """The sliding window; if the accelerator runs out of memory for the accumulation, the case is
        redone with the accumulation (not the network) on the CPU, with a warning."""
        try:
            return sliding_window(self.model, tensor, tasks, self.window, on_progress=on_progress)
        except torch.OutOfMemoryError:
            if self.device.type == "cpu":
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            log.warning("out of %s memory for a %s volume: accumulating on the CPU (slower; the network stays "
                        "on %s)", self.device, "×".join(map(str, tensor.shape[1:])), self.device)
            return sliding_window(self.model, tensor, tasks, self.window, on_progress=on_progress,
                                  accumulate_on=torch.device("cpu"))

    def task_key(self, spec: str) -> str:
        """``all``, the key of the task ``spec`` names, or ``liver+spleen`` for a list (used in output names
        and results)."""
        return ALL_TASKS if _is_all(spec) else "+".join(t.key for t in self.subset(spec))

    def predict_file(self, channels: str | Path | Sequence[str | Path], task: str, output: str | Path,
                     **options: Any) -> CaseResult:
        """Segment one case given as a file (or its channel files, in the task's order) into ``output``."""
        paths = (Path(channels),) if isinstance(channels, (str, Path)) else tuple(Path(p) for p in channels)
        return self.predict_case(Case(case_name(paths[0]), paths), task, Path(output), **options)

    def predict_files(self, files: Sequence[str | Path], task: str, output_dir: str | Path,
                      **options: Any) -> list[CaseResult]:
        """Segment a list of files, grouped into cases by nnU-Net's channel naming, into ``output_dir``."""
        key = self.task_key(task)
        cases = group_channel_files([Path(f) for f in files])
        return [self.predict_case(c, task, output_path(c, key, Path(output_dir), single=False), **options)
                for c in cases]

    def plan(self, case: Case, task: str, output: Path, *, options: OutputOptions = OutputOptions(),
             probabilities: str | None = None) -> CasePlan:
        """Every file ``case`` will write with these options, its first output at ``output``. With ``all``
        and ``--split`` the tasks depend on the scan, so the plan names every task's files (each case
        is planned again, for the tasks that fit, once it is read)."""
        split = [t.key for t in (self.tasks if _is_all(task) else self.subset(task))] if options.split else []
        return plan_case(case, self.task_key(task), output, options, split_tasks=split, probabilities=probabilities)

    def predict_case(self, case: Case, task: str, output: Path, *, probabilities: str | None = None,
                     modality: str | None = None, allow_gaps: bool = False, outputs: OutputOptions = OutputOptions(),
                     on_progress: Callable[[int, int], None] | None = None) -> CaseResult:
        """Read, segment and write one case; errors are raised (the batch runner turns them into results)."""
        plan = self.plan(case, task, output, options=outputs, probabilities=probabilities)
        check_plans([plan])
        prepared = self.prepare_case(case, task, plan, modality=modality, allow_gaps=allow_gaps, outputs=outputs)
        prediction = self.run(prepared.inputs, probabilities=probabilities is not None, split=outputs.split,
                              on_progress=on_progress)
        return self.export(prepared, prediction, outputs=outputs)

    def prepare_case(self, case: Case, task: str, plan: CasePlan, *, modality: str | None = None,
                     allow_gaps: bool = False, outputs: OutputOptions = OutputOptions()) -> PreparedCase:
        """Read and pre-process one case (no network): what the batch runner prefetches in a thread.
        Callers have checked the plan against the inputs (the batch, all plans up front).
        ``allow_gaps`` accepts DICOM series with missing or unevenly spaced slices."""
        start = time.perf_counter()
        data, geometry = read_channels(case.channels, allow_gaps=allow_gaps)
        if outputs.needs_dicom:
            if not geometry.dicom_files:
                raise UnisegError(f"{case.channels[0]}: not a DICOM series; --output-format "
                                  f"{', '.join(outputs.formats)} needs one")
            check_references(geometry)  # before the network: a SEG would reference nothing
        intensity = data[0].copy() if outputs.needs_intensity else None  # statistics and previews: original units
        inputs = self.prepare_array(data, geometry.spacing, task, axis_world=geometry.array_axis_world(),
                                    source=str(case.channels[0]), modality=modality)
        if plan.maps[0].task is not None and _is_all(task):  # 'all' --split: the maps of the tasks that fit
            plan = plan_case(case, plan.key, plan.primary, outputs, probabilities=_probability_format(plan),
                             split_tasks=list(inputs.offsets))
        return PreparedCase(case, inputs.key, plan, geometry, inputs, start, intensity)

    def export(self, prepared: PreparedCase, prediction: Prediction, *,
               outputs: OutputOptions = OutputOptions()) -> CaseResult:
        """Write the case's planned files (``uniseg_cli.outputs.export``); the record ``--json`` prints."""
        return export_case(prepared, prediction, model=self.model_name, device=str(self.device), options=outputs)


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def _is_all(spec: str) -> bool:
    return spec.strip().lower() == ALL_TASKS


def _group_by_preprocessing(tasks: Sequence[Task]) -> list[list[Task]]:
    """Tasks that share spacing and normalisation share one pre-processed input and one encoder pass."""
    groups: dict[tuple[Any, ...], list[Task]] = {}
    for task in tasks:
        groups.setdefault((task.target_spacing, task.channels), []).append(task)
    return list(groups.values())


def _probability_format(plan: CasePlan) -> str | None:
    if plan.probabilities is None:
        return None
    return "npz" if plan.probabilities.name.endswith(".npz") else "nifti"
