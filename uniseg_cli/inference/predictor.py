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

from uniseg_cli.data.preprocessing import (EXPORT_SLAB_BYTES, CropInfo, labels_from_probabilities, preprocess,
                                           resample_probabilities, uncrop)
from uniseg_cli.devices import pick_device
from uniseg_cli.errors import UnisegError, UsageError
from uniseg_cli.inference.cases import Case, case_name, group_channel_files, output_path
from uniseg_cli.inference.phases import CaseResult, Label, NetworkInputs, Prediction, PreparedCase
from uniseg_cli.inference.runtime import choose_precision
from uniseg_cli.inference.sliding_window import WindowOptions, heads, sliding_window
from uniseg_cli.io.images import read_channels
from uniseg_cli.labels import Head, Structure
from uniseg_cli.model.files import WEIGHTS_NAME, load_model
from uniseg_cli.model.network import UniSeg
from uniseg_cli.outputs.dicom import check_references
from uniseg_cli.outputs.export import export_case
from uniseg_cli.outputs.formats import OutputOptions
from uniseg_cli.outputs.plan import PROBABILITY_ENDINGS, CasePlan, check_plans, plan_case
from uniseg_cli.quality.postprocess import PostProcessing, apply_postprocessing
from uniseg_cli.quality.plausibility import article, channel_sources, check_inputs, enforce, expected_modality, scan_modality
from uniseg_cli.tasks import Task, resolve_task
from uniseg_cli.weights.hub import resolve_model

log = logging.getLogger(__name__)

ALL_TASKS = "all"
PROBABILITY_FORMATS = tuple(PROBABILITY_ENDINGS)


class Segmenter:
    """A loaded model with run options; ``predict_*`` methods segment one case at a time.

    model: a model spec (folder, registry name, ``owner/name[@revision]``; None = the default model)
        or a loaded ``UniSeg``.
    device: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or a device.
    window: sliding-window step, mirroring TTA, tiles per forward pass and precision (``auto``: fp16
        autocast on CUDA, fp32 elsewhere; ``runtime.choose_precision``).
    postprocessing: nnU-Net's connected-component clean-up before writing (``uniseg_cli.quality.postprocess``).
    max_memory: bytes the arrays of one case may take (network input, probability accumulators,
        export slabs; the network's own working memory per tile is not counted): a case that needs more
        is refused before its sliding window starts, and the export resampling works in slabs that fit.
    """

    def __init__(self, model: str | Path | UniSeg | None, *, device: str | torch.device = "auto",
                 window: WindowOptions = WindowOptions(), max_memory: int | None = None,
                 postprocessing: PostProcessing = PostProcessing()) -> None:
        if not 0 < window.step <= 1:
            raise UsageError(f"--step must be in (0, 1], got {window.step}")
        if window.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {window.batch_size}")
        self.device = pick_device(device) if isinstance(device, str) else torch.device(device)
        self.weights_file: Path | None = None  # the model's weights file (its SHA-256 goes into run reports)
        if isinstance(model, UniSeg):
            self.model, self.model_name = model.to(self.device).eval(), "(in memory)"
        else:
            resolved = resolve_model(model)
            self.model, self.model_name = load_model(resolved.path, device=self.device), resolved.spec
            where = Path(resolved.path)
            self.weights_file = where if where.is_file() else where / WEIGHTS_NAME
        choice = choose_precision(window.precision, self.device)
        log.debug("precision %s (%s)", choice.precision, choice.why)
        self.window = window.resolved(self.device)  # the network's layout follows in the sliding window
        self.max_memory = max_memory
        self.postprocessing = postprocessing

    @property
    def tasks(self) -> tuple[Task, ...]:
        return self.model.config.tasks

    # ------------------------------------------------------------------------------------ tasks
    def select_tasks(self, spec: str, data: np.ndarray, *, source: str, modality: str | None = None,
                     dicom_modality: str = "") -> list[Task]:
        """The task(s) ``spec`` names for this input; refuses tasks whose channels do not fit. ``all`` and
        task lists keep the tasks of the scan's modality (``modality``, else the DICOM tag, else whether
        the scan has air in HU: ``quality.plausibility.scan_modality``)."""
        channels = data.shape[0]
        if not _is_all(spec):
            chosen = self.subset(spec)
            for task in chosen:
                if len(task.channels) != channels:
                    wanted = ", ".join(c.name for c in task.channels)
                    raise UnisegError(f"{source}: task {task.key!r} takes {len(task.channels)} channel(s) ({wanted}); "
                                      f"the case has {channels}")
            if len(chosen) == 1:
                return chosen  # one task named: the plausibility check says whether the scan fits it
            return self._of_modality(chosen, data, source, modality, dicom_modality, listed=True)
        fitting = [t for t in self.tasks if len(t.channels) == channels]
        if not fitting:
            raise UnisegError(f"{source}: no task of the model takes {channels} channel(s)")
        return self._of_modality(fitting, data, source, modality, dicom_modality, listed=False)

    def _of_modality(self, tasks: list[Task], data: np.ndarray, source: str, modality: str | None,
                     dicom_modality: str, *, listed: bool) -> list[Task]:
        if modality is not None:
            kind, why = modality.upper(), "--modality"
        else:
            kind, why = scan_modality(data, dicom_modality)
        kept = [t for t in tasks if expected_modality(t.channels[0]) == kind]
        if not kept:
            raise UnisegError(f"{source}: no {'listed ' if listed else ''}task of the model takes {article(kind)} {kind} "
                              f"scan with {data.shape[0]} channel(s) (taken for {kind}: {why}; --modality says "
                              "otherwise)")
        left_out = [t.key for t in tasks if t not in kept]
        if left_out:
            log.info("%s: taken for %s (%s); left out %s", source, kind, why, ", ".join(left_out))
        return kept

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
                      modality: str | None = None, sources: Sequence[str] | None = None,
                      accept_implausible: bool = False,
                      on_progress: Callable[[int, int], None] | None = None) -> Prediction:
        """Segment a ``(channels, z, y, x)`` (or ``(z, y, x)``) array with ``spacing`` (z, y, x) in mm.

        ``axis_world`` says which world axis each array axis runs along (0 L-R, 1 A-P, 2 S-I); the
        default is an axially stored scan. The input checks of ``prepare_array`` apply.
        """
        inputs = self.prepare_array(data, spacing, task, axis_world=axis_world, source=source, modality=modality,
                                    sources=sources, accept_implausible=accept_implausible)
        return self.run(inputs, probabilities=probabilities, on_progress=on_progress)

    def prepare_array(self, data: np.ndarray, spacing: Sequence[float], task: str | Sequence[Task], *,
                      axis_world: Sequence[int] = (2, 1, 0), source: str = "array",
                      modality: str | None = None, sources: Sequence[str] | None = None,
                      dicom_modalities: Sequence[str] = (), accept_implausible: bool = False) -> NetworkInputs:
        """The CPU half of ``predict_array``: choose the tasks, check that the scan is what they expect
        (``uniseg_cli.quality.plausibility``; ``accept_implausible`` logs and records instead of refusing)
        and pre-process once per spacing group. ``sources`` names each channel's file in messages."""
        data = np.asarray(data, dtype=np.float32)
        data = data[None] if data.ndim == 3 else data
        if data.ndim != 4:
            raise UnisegError(f"{source}: expected a (channels, z, y, x) array, got shape {data.shape}")
        if isinstance(task, str):
            tasks = self.select_tasks(task, data, source=source, modality=modality,
                                      dicom_modality=dicom_modalities[0] if dicom_modalities else "")
            merged, key = _is_all(task) or len(tasks) > 1, self.task_key(task)
        else:
            tasks, merged = list(task), len(task) > 1
            key = "+".join(t.key for t in tasks) if merged else tasks[0].key
        names = (list(sources) if sources is not None else
                 [source] if data.shape[0] == 1 else [f"{source} (channel {i + 1})" for i in range(data.shape[0])])
        findings = {f: None for channels in dict.fromkeys(t.channels for t in tasks)
                    for f in check_inputs(data, channels, names, dicom_modalities)}
        accepted = enforce(list(findings), accept=accept_implausible)
        legend, offsets = self.legend(tasks, merged=merged)
        groups = [(group, *self._preprocess(data, tuple(spacing), axis_world, group[0], source=source))
                  for group in _group_by_preprocessing(tasks)]
        return NetworkInputs(key, tuple(data.shape[1:]), legend, offsets, groups,  # type: ignore[arg-type]
                             regions=self.regions(tasks, offsets), accepted=accepted)

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

    @property
    def mirrored(self) -> bool:
        """Whether the window averages mirrored copies (TTA on and the model allows some flip)."""
        return self.window.mirror and bool(self.model.config.mirror_axes)

    def run(self, inputs: NetworkInputs, *, probabilities: bool = False, split: bool = False,
            uncertainty: bool = False, on_progress: Callable[[int, int], None] | None = None) -> Prediction:
        """The network half: sliding window per group, probabilities back to the input grid, merged labels
        (and, with ``split``, each task's own map). ``uncertainty`` keeps the probabilities and, with TTA,
        each flip's averaged entropy (``uniseg_cli.quality.confidence``)."""
        single = sum(len(group) for group, _, _ in inputs.groups) == 1
        merged = None if single else np.zeros(inputs.shape, dtype=np.uint8)
        # Groups run in spacing order, not task order: where tasks overlap the later task must win, so
        # each voxel remembers the rank (1 + position in task order) of the task that labelled it.
        rank = {key: i + 1 for i, key in enumerate(inputs.offsets)}
        owner = None if single else np.zeros(inputs.shape, dtype=np.uint8)
        saved: dict[str, np.ndarray] = {}
        flips: dict[str, np.ndarray] = {}
        per_task: dict[str, np.ndarray] = {}
        keep, flip_entropy = probabilities or uncertainty, uncertainty and self.mirrored
        for group, x, info in inputs.groups:
            slab_bytes = self._memory_budget(x, group, info, inputs.shape)
            tensor = x.to(self.device)
            with torch.inference_mode():
                outputs = self._window(tensor, heads(group), on_progress, flip_entropy=flip_entropy)
                for task_, probs in zip(group, outputs):
                    if flip_entropy:
                        probs, entropy = probs[:-1], probs[-1:]
                        flips[task_.key] = uncrop(resample_probabilities(entropy, info)[0].cpu().numpy(), info)
                        del entropy
                    labels_t, p = labels_from_probabilities(probs, info, keep=keep, slab_bytes=slab_bytes,
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
        managers = {t.key: t.label_manager for group, _, _ in inputs.groups for t in group}
        return Prediction(merged, inputs.legend, saved, ordered, regions=inputs.regions, offsets=dict(inputs.offsets),
                          managers=managers, flip_entropy=flips)

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

    def _window(self, tensor: torch.Tensor, tasks: list[Head], on_progress: Callable[[int, int], None] | None, *,
                flip_entropy: bool = False) -> list[torch.Tensor]:
        """The sliding window; if the accelerator runs out of memory for the accumulation, the case is
        redone with the accumulation (not the network) on the CPU, with a warning."""
        try:
            return sliding_window(self.model, tensor, tasks, self.window, on_progress=on_progress,
                                  flip_entropy=flip_entropy)
        except torch.OutOfMemoryError:
            if self.device.type == "cpu":
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            log.warning("out of %s memory for a %s volume: accumulating on the CPU (slower; the network stays "
                        "on %s)", self.device, "×".join(map(str, tensor.shape[1:])), self.device)
            return sliding_window(self.model, tensor, tasks, self.window, on_progress=on_progress,
                                  accumulate_on=torch.device("cpu"), flip_entropy=flip_entropy)

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
                     accept_implausible: bool = False,
                     on_progress: Callable[[int, int], None] | None = None) -> CaseResult:
        """Read, segment and write one case; errors are raised (the batch runner turns them into results)."""
        outputs = replace(outputs, disagreement=outputs.uncertainty and self.mirrored)
        plan = self.plan(case, task, output, options=outputs, probabilities=probabilities)
        check_plans([plan])
        prepared = self.prepare_case(case, task, plan, modality=modality, allow_gaps=allow_gaps, outputs=outputs,
                                     accept_implausible=accept_implausible)
        prediction = self.run(prepared.inputs, probabilities=probabilities is not None, split=outputs.split,
                              uncertainty=outputs.uncertainty, on_progress=on_progress)
        return self.export(prepared, prediction, outputs=outputs)

    def prepare_case(self, case: Case, task: str, plan: CasePlan, *, modality: str | None = None,
                     allow_gaps: bool = False, outputs: OutputOptions = OutputOptions(),
                     accept_implausible: bool = False) -> PreparedCase:
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
        sources = channel_sources(case.channels, data.shape[0])
        inputs = self.prepare_array(data, geometry.spacing, task, axis_world=geometry.array_axis_world(),
                                    source=str(case.channels[0]), modality=modality, sources=sources,
                                    dicom_modalities=geometry.modalities, accept_implausible=accept_implausible)
        if plan.maps[0].task is not None and _is_all(task):  # 'all' --split: the maps of the tasks that fit
            plan = plan_case(case, plan.key, plan.primary, outputs, probabilities=_probability_format(plan),
                             split_tasks=list(inputs.offsets))
        return PreparedCase(case, inputs.key, plan, geometry, inputs, start, intensity)

    def export(self, prepared: PreparedCase, prediction: Prediction, *,
               outputs: OutputOptions = OutputOptions()) -> CaseResult:
        """Post-process (if asked) and write the case's planned files (``uniseg_cli.outputs.export``); the
        record ``--json`` prints."""
        done = None
        if self.postprocessing.active:
            prediction, removed = apply_postprocessing(prediction, float(np.prod(prepared.geometry.spacing)) / 1000.0,
                                                       self.postprocessing)
            done = {**self.postprocessing.to_json(), "removed_voxels": removed.voxels}
        return export_case(prepared, prediction, model=self.model_name, device=str(self.device), options=outputs,
                           postprocessing=done)

    def label_names(self) -> list[str]:
        """Every class and region name of the model's tasks (what ``--keep-largest`` may name)."""
        return [s.name for t in self.tasks for s in (*t.label_manager.classes, *t.label_manager.regions)]


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
