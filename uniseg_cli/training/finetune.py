"""``uniseg finetune``: a pretrained UniSeg model, adapted to one new dataset, in one command.

Two ways to carry the pretrained weights over (the weights are copied by name; what cannot be copied
is said in the log):

- ``downstream`` (the paper's transfer protocol): every encoder and decoder weight is kept; the
  universal prompt and the fusion layer are dropped, and with them the prompt's input channel of the
  first transposed convolution (``tu.0``); the segmentation heads are new, sized for the dataset's
  labels. The result is a plain U-Net whose one task is the dataset (``prompted: false``).
- ``new-task``: the prompt machinery stays and the dataset becomes one more task: one more prompt
  channel, one more output of the fusion layer, and more head outputs if the dataset has more classes
  than the model emits. The fusion layer keeps its pretrained hidden width, and the new prompt channel
  enters it through zero weights. With ``freeze_upstream`` only the new task's own weights train (its
  prompt, its fusion output, new head outputs, a new input convolution), so the upstream tasks give
  exactly the logits they gave before.

A dataset whose channel count has no input convolution in the model gets a new one (``conv_<n>``),
trained from scratch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from uniseg_cli.config import ALL_AXES
from uniseg_cli.quality.plausibility import channel_sources
from uniseg_cli.data.datasets import default_task_key, label_classes, read_dataset
from uniseg_cli.data.training_cache import TaskData, preprocess_datasets
from uniseg_cli.errors import UsageError
from uniseg_cli.inference.sliding_window import WindowOptions
from uniseg_cli.io.atomic import make_folder, write_text
from uniseg_cli.io.images import read_channels, read_image, write_array
from uniseg_cli.metrics import CaseScores, report, score_arrays
from uniseg_cli.model.files import load_model
from uniseg_cli.model.network import UniSeg
from uniseg_cli.outputs.formats import OUTPUT_MARK
from uniseg_cli.tasks import Task
from uniseg_cli.training.trainer import (
    SPLITS_NAME,
    Trainable,
    TrainOptions,
    TrainResult,
    read_splits,
    select_fold,
    train,
)
from uniseg_cli.weights.hub import resolve_model

log = logging.getLogger(__name__)

MODES = ("downstream", "new-task")
EVALUATION_NAME = "evaluation.json"
VALIDATION_FOLDER = "validation"  # the held-out cases' label maps evaluation.json scored
#: The paper's downstream fine-tuning: 100 epochs × 250 batches, lr 0.01, the same optimiser.
FINETUNE_EPOCHS = 100
FINETUNE_BATCHES = 250


@dataclass
class Surgery:
    """The model to fine-tune, initialised from the pretrained one, and what of it trains."""

    model: UniSeg
    trainable: Trainable
    notes: list[str]


def _fresh(config: Any, seed: int) -> UniSeg:
    torch.manual_seed(seed)
    return UniSeg(config)


def _input_channels(pretrained: UniSeg, count: int, notes: list[str]) -> None:
    if count not in pretrained.config.input_channels:
        notes.append(f"the model has no input convolution for {count} channel(s) "
                     f"(it has {', '.join(map(str, pretrained.config.input_channels))}): a new conv_{count} is "
                     "trained from scratch")


def downstream_model(pretrained: UniSeg, task: Task, *, seed: int = 0) -> Surgery:
    """The paper's downstream model: pretrained encoder/decoder, no prompt, new heads for ``task``."""
    notes: list[str] = []
    count = len(task.channels)
    _input_channels(pretrained, count, notes)
    config = pretrained.config.with_changes(tasks=(replace(task, id=0),), prompted=False, fusion_width=None,
                                            num_classes=task.label_manager.num_outputs, input_channels=(count,))
    model = _fresh(config, seed)
    old = pretrained.state_dict()
    new = model.state_dict()
    features = config.stage_features[-1]
    copied = 0
    for name, tensor in new.items():
        if name.startswith("seg_outputs."):
            continue  # new heads for the dataset's labels
        source = old.get(name)
        if name == "tu.0.weight" and source is not None:
            source = source[:features]  # drop the prompt map's input channel (the last one)
        if source is not None and source.shape == tensor.shape:
            tensor.copy_(source)
            copied += 1
    dropped = [n for n in old if n.startswith(("intermedia_prompt", "fusion_layer."))]
    notes.append(f"downstream: {copied} pretrained tensors kept, {len(dropped)} of the prompt and fusion layer "
                 f"dropped, tu.0 without its prompt channel, new heads for {task.label_manager.num_outputs} outputs")
    return Surgery(model, Trainable(), notes)


def new_task_model(pretrained: UniSeg, task: Task, *, freeze_upstream: bool, seed: int = 0) -> Surgery:
    """The pretrained model with ``task`` added as its last prompted task."""
    if not pretrained.config.prompted:
        raise UsageError("--mode new-task needs a model with the universal prompt; this one is a downstream model")
    old_config = pretrained.config
    if task.key in {t.key for t in old_config.tasks}:
        raise UsageError(f"the model already has a task {task.key!r}; name the new one with --task-name")
    notes: list[str] = []
    count = len(task.channels)
    _input_channels(pretrained, count, notes)
    tasks_before = old_config.num_tasks
    classes_before = old_config.num_classes
    config = old_config.with_changes(
        tasks=old_config.tasks + (replace(task, id=tasks_before),),
        num_classes=max(classes_before, task.label_manager.num_outputs),
        input_channels=tuple(sorted({*old_config.input_channels, count})),
        fusion_width=old_config.fusion_features,
    )
    model = _fresh(config, seed)
    old = pretrained.state_dict()
    features = config.stage_features[-1]
    last = f"fusion_layer.blocks.{len(model.fusion_layer.blocks) - 1}."
    masks: dict[str, torch.Tensor | None] = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            source = old.get(name)
            if source is None:                                   # a new input convolution
                masks[name] = None
                continue
            if source.shape == tensor.shape:
                tensor.copy_(source)
                continue
            if name == "intermedia_prompt":
                tensor[:, :tasks_before] = source
                masks[name] = _rows(tensor.shape, 1, tasks_before)
            elif name == "fusion_layer.blocks.0.conv.weight":      # input: bottleneck features, then prompts
                tensor[:, :features + tasks_before] = source
                tensor[:, features + tasks_before:] = 0             # the new prompt enters through zeros
            elif name.startswith(last):                             # one more output: the new task's map
                tensor[:tasks_before] = source
                masks[name] = _rows(tensor.shape, 0, tasks_before)
            elif name.startswith("seg_outputs."):                   # more classes than the model emitted
                tensor[:classes_before] = source
                masks[name] = _rows(tensor.shape, 0, classes_before)
            else:
                raise UsageError(f"cannot grow {name} from {tuple(source.shape)} to {tuple(tensor.shape)}")
    notes.append(f"new-task: task {task.key!r} added as prompt {tasks_before} ({tasks_before + 1} tasks), fusion "
                 f"width kept at {config.fusion_features}, {config.num_classes} output classes"
                 + ("; only the new task's weights train (--freeze-upstream)" if freeze_upstream else ""))
    trainable = Trainable({n: m for n, m in masks.items()}) if freeze_upstream else Trainable()
    return Surgery(model, trainable, notes)


def _rows(shape: torch.Size, axis: int, start: int) -> torch.Tensor:
    """A mask that is True from index ``start`` on along ``axis``."""
    mask = torch.zeros(shape, dtype=torch.bool)
    index = [slice(None)] * len(shape)
    index[axis] = slice(start, None)
    mask[tuple(index)] = True
    return mask


@dataclass
class FinetuneResult:
    training: TrainResult
    evaluation: dict[str, Any] | None


def finetune(dataset: str | Path, output: str | Path, *, model: str | None, mode: str = "downstream",
             task_name: str | None = None, freeze_upstream: bool = False, preprocessed: str | Path | None = None,
             target_spacing: tuple[float, float, float] | None = None, workers: int | None = None,
             tolerance: float = 1.0, window: WindowOptions = WindowOptions(),
             mirror_axes: tuple[int, ...] | None = None, accept_implausible: bool = False,
             options: TrainOptions = TrainOptions(epochs=FINETUNE_EPOCHS, batches_per_task=FINETUNE_BATCHES)
             ) -> FinetuneResult:
    """Check and pre-process ``dataset`` (cached), adapt the pretrained model, train, and evaluate the
    held-out cases with ``window`` (predict's options: the same defaults, the same flags).

    ``mirror_axes`` are the axes training mirrors and the fine-tuned model's TTA flips; by default all
    three (nnU-Net's recipe for a new dataset) in ``downstream`` mode, and the pretrained model's in
    ``new-task`` mode, so that the tasks it keeps keep their TTA. ``accept_implausible`` trains on and
    evaluates scans that fail the input checks (``uniseg_cli.quality.plausibility``), with warnings."""
    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if freeze_upstream and mode != "new-task":
        raise UsageError("--freeze-upstream applies to --mode new-task")
    dataset, output = Path(dataset), Path(output)
    resolved = resolve_model(model)
    pretrained = load_model(resolved.path)
    key = (task_name or default_task_key(dataset)).lower()
    cache = Path(preprocessed) if preprocessed else output.parent / f"{output.name}-preprocessed"
    log.info("pre-processing %s into %s (reused when it is already there)", dataset, cache)
    (data,) = preprocess_datasets([f"{key}={dataset}"], cache, known=(), workers=workers,
                                  progress=options.progress, target_spacing=target_spacing,
                                  accept_implausible=accept_implausible)
    surgery = (downstream_model(pretrained, data.task, seed=options.seed) if mode == "downstream"
               else new_task_model(pretrained, data.task, freeze_upstream=freeze_upstream, seed=options.seed))
    for note in surgery.notes:
        log.info("%s", note)
    config = surgery.model.config.with_changes(
        source=f"fine-tuned ({mode}) with `uniseg finetune` from {resolved.spec} on {data.dataset} ({len(data.cases)} cases); "
               f"pretrained: {pretrained.config.source or 'not recorded'}",
        mirror_axes=tuple(mirror_axes) if mirror_axes is not None else
        ALL_AXES if mode == "downstream" else pretrained.config.mirror_axes)
    training = train(cache, output, config=config, options=options,
                     init_state=None if options.resume else surgery.model.state_dict(), trainable=surgery.trainable,
                     tasks=[data])
    evaluation = evaluate_validation(output, data, options, tolerance, window=window,
                                     accept_implausible=accept_implausible)
    return FinetuneResult(training, evaluation)


def evaluate_validation(output: Path, data: TaskData, options: TrainOptions, tolerance: float, *,
                        window: WindowOptions = WindowOptions(), accept_implausible: bool = False
                        ) -> dict[str, Any] | None:
    """Segment the fold's held-out cases from their raw files with the final model (``predict``'s
    pipeline, with ``window``'s step, mirroring and precision) and score them against their raw label
    maps: ``evaluation.json``."""
    from uniseg_cli.inference.predictor import Segmenter

    [(_, held_out)] = select_fold(read_splits(output / SPLITS_NAME, [data]), [data], options.fold)
    if not held_out:
        log.info("no held-out cases (fold %s): no evaluation.json", options.fold)
        return None
    segmenter = Segmenter(output, device=options.device, window=window)
    predictions = output / VALIDATION_FOLDER
    make_folder(predictions)
    cases: list[CaseScores] = []
    for name in held_out:
        props = data.properties(name)
        image, geometry = read_channels(props["channels"])
        prediction = segmenter.predict_array(image, geometry.spacing, data.task.key,
                                             axis_world=geometry.array_axis_world(), source=props["channels"][0],
                                             sources=channel_sources(props["channels"], image.shape[0]),
                                             accept_implausible=accept_implausible)
        reference = label_classes(read_image(props["label"])[0][0], data.label_values)
        written = predictions / f"{name}.nii.gz"   # what was scored, for a look in a viewer (nnU-Net's validation/)
        write_array(written, prediction.labels, geometry, description=OUTPUT_MARK)
        task = data.task  # a region task is scored per region, as nnU-Net and BraTS score it
        cases.append(score_arrays(name, str(written), props["label"], prediction.labels, reference,
                                  geometry.spacing, list(range(1, task.num_classes)), tolerance,
                                  regions=[(s.name, s.values) for s in task.label_manager.regions]))
        log.info("held-out %s: Dice %s", name, ", ".join(f"{s.label}: {s.dice:.3f}" for s in cases[-1].labels))
    result = report(cases, tolerance)
    result["labels"] = {str(i): label for i, label in enumerate(data.task.labels, start=1)}
    result["model"] = str(output)
    result["settings"] = {"step": window.step, "tta": window.mirror, "precision": segmenter.window.precision_label}
    write_text(output / EVALUATION_NAME, json.dumps(result, indent=2) + "\n")
    return result


__all__ = ["MODES", "finetune", "downstream_model", "new_task_model", "read_dataset"]
