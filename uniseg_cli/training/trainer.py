"""``uniseg train``: the published multi-task recipe (docs/pipeline.md §5) on a pre-processed folder.

One batch is one task; each epoch gives every task the same number of batches. SGD with Nesterov
momentum 0.99, weight decay 3e-5, poly learning rate (power 0.9, per epoch), gradient norm clipped at
12, fp16 autocast with a gradient scaler on CUDA (bf16 autocast in the channels-last layout on CPUs
with bf16 matrix units, see ``resolve_training_precision``). Validation runs the sliding window of
``predict`` (no mirroring, at the training's precision) over each task's held-out cases and logs the
Dice of every class.

The output folder is a model folder (``config.json`` + ``model.safetensors``, the final weights) with
``best/`` (the weights of the best validation), ``training_state.pt`` (everything ``--resume``
needs, saved atomically after every epoch, tensors only: it loads with ``weights_only=True``),
``training_log.jsonl``, ``training_curves.png`` and ``splits.json``.

Under ``torchrun`` it trains with DistributedDataParallel: every rank draws different batches of
the same epoch plan, rank 0 alone validates, logs and writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from uniseg_cli.config import UniSegConfig, small_config
from uniseg_cli.data.training_cache import TaskData, read_plan
from uniseg_cli.devices import pick_device
from uniseg_cli.errors import UnisegError, UsageError
from uniseg_cli.inference.runtime import AUTOCAST_DTYPES, channels_last, resolve_training_precision
from uniseg_cli.inference.sliding_window import WindowOptions, heads, sliding_window
from uniseg_cli.io.atomic import atomic_file, make_folder, write_text
from uniseg_cli.io.jsonfile import read_json
from uniseg_cli.model.files import save_model, write_weights
from uniseg_cli.model.network import UniSeg
from uniseg_cli.progress import counting_bar
from uniseg_cli.training.augment import augment_batch
from uniseg_cli.training.loss import deep_supervision_loss
from uniseg_cli.training.sampling import EpochSampler, PatchBatches, SpatialOptions

log = logging.getLogger(__name__)

STATE_NAME = "training_state.pt"
LOG_NAME = "training_log.jsonl"
PLOT_NAME = "training_curves.png"
SPLITS_NAME = "splits.json"
BEST_FOLDER = "best"
PRESETS = ("published", "small")
GRADIENT_CLIP = 12.0
MOMENTUM = 0.99
WEIGHT_DECAY = 3e-5
SPLIT_SEED = 12345


@dataclass
class TrainOptions:
    """The run's options; defaults are the published recipe (1000 epochs × 50 batches per task)."""

    epochs: int = 1000
    batches_per_task: int = 50
    batch_size: int = 2
    learning_rate: float = 1e-2
    fold: str = "0"
    folds: int = 5
    split_file: Path | None = None
    val_every: int = 50
    device: str = "auto"
    workers: int = 2
    seed: int = 0
    resume: bool = False
    augment: bool = True
    progress: bool = True
    freeze_encoder_epochs: int = 0
    precision: str = "auto"


@dataclass
class TrainResult:
    output: Path
    epochs: int
    final_loss: float
    best_dice: float | None
    best_epoch: int | None
    log: list[dict[str, Any]] = field(default_factory=list)


def training_config(tasks: Sequence[TaskData], preset: str = "published", *, patch_size: Sequence[int] | None = None,
                    base_features: int | None = None, max_features: int | None = None,
                    mirror_axes: Sequence[int] | None = None) -> UniSegConfig:
    """The network for these tasks: the preset's architecture, as many outputs and input convolutions
    as the tasks need; ``mirror_axes`` those that training flips and TTA then flips (default all)."""
    if preset not in PRESETS:
        raise UsageError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    base = UniSegConfig() if preset == "published" else small_config()
    changes: dict[str, Any] = {
        "tasks": tuple(t.task for t in tasks),
        "num_classes": max(t.task.label_manager.num_outputs for t in tasks),
        "input_channels": tuple(sorted({len(t.task.channels) for t in tasks})),
        "source": "trained with `uniseg train` on " + "; ".join(f"{t.task.key}: {t.dataset} ({len(t.cases)} cases)"
                                                          for t in tasks),
    }
    if patch_size is not None:
        changes["patch_size"] = tuple(int(p) for p in patch_size)
    if base_features is not None:
        changes["base_features"] = base_features
    if max_features is not None:
        changes["max_features"] = max_features
    if mirror_axes is not None:
        changes["mirror_axes"] = tuple(mirror_axes)
    return base.with_changes(**changes)


# ------------------------------------------------------------------------------------- splits
def make_splits(tasks: Sequence[TaskData], folds: int) -> dict[str, list[dict[str, list[str]]]]:
    """nnU-Net's split: per task, cases shuffled with seed 12345 and cut into ``folds`` parts (fewer
    parts when a task has fewer cases; a task with one case has no validation)."""
    splits = {}
    for data in tasks:
        names = sorted(data.cases)
        parts = min(folds, len(names))
        if parts < 2:
            splits[data.task.key] = [{"train": names, "val": []}]
            continue
        order = np.random.RandomState(SPLIT_SEED).permutation(len(names))
        chunks = np.array_split(order, parts)
        splits[data.task.key] = [{"train": sorted(names[i] for i in order if i not in set(chunk)),
                                  "val": sorted(names[i] for i in chunk)} for chunk in chunks]
    return splits


def read_splits(path: Path, tasks: Sequence[TaskData]) -> dict[str, list[dict[str, list[str]]]]:
    """A split file: ``{task: [{train, val}, …]}``, or nnU-Net's ``splits_final.json`` list for one task."""
    raw = read_json(path, UsageError, missing="no such split file")
    if isinstance(raw, list):
        if len(tasks) != 1:
            raise UsageError(f"{path}: a list of folds fits one task; with several tasks use {{task: [folds]}}")
        raw = {tasks[0].task.key: raw}
    for data in tasks:
        folds = raw.get(data.task.key) if isinstance(raw, dict) else None
        if not isinstance(folds, list) or not folds:
            raise UsageError(f"{path}: no folds for task {data.task.key!r}")
        for fold in folds:
            if not isinstance(fold, dict) or not isinstance(fold.get("train"), list) or not isinstance(fold.get("val"), list):
                raise UsageError(f"{path}: task {data.task.key!r}: every fold needs train and val lists of case names "
                                 "(val may be empty)")
            unknown = (set(fold["train"]) | set(fold.get("val", []))) - set(data.cases)
            if unknown:
                raise UsageError(f"{path}: task {data.task.key!r} names unknown case(s) {sorted(unknown)[:3]}")
    return raw


def select_fold(splits: dict[str, list[dict[str, list[str]]]], tasks: Sequence[TaskData],
                fold: str) -> list[tuple[list[str], list[str]]]:
    """(train, validation) cases per task for ``fold`` (a number, or ``all``: train on everything)."""
    chosen = []
    for data in tasks:
        if fold == "all":
            chosen.append((sorted(data.cases), []))
            continue
        folds = splits[data.task.key]
        if int(fold) >= len(folds):
            raise UsageError(f"--fold {fold}: task {data.task.key!r} has {len(folds)} fold(s), numbered 0 to {len(folds) - 1}")
        entry = folds[int(fold)]
        chosen.append((list(entry["train"]), list(entry["val"])))
        if not entry["train"]:
            raise UsageError(f"task {data.task.key!r}: fold {fold} leaves no training cases")
    return chosen


# -------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _distributed_from_env() -> Distributed:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    return Distributed(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


# ------------------------------------------------------------------------------------ freezing
@dataclass
class Trainable:
    """Which weights train: ``None`` = all; else only the named parameters, each wholly (mask None) or
    only where its boolean mask is True (the rest is put back after every optimiser step, so neither
    gradients nor momentum nor weight decay move it)."""

    masks: dict[str, torch.Tensor | None] | None = None
    _kept: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)

    def apply(self, model: UniSeg) -> Trainable:
        if self.masks is not None:
            unknown = set(self.masks) - {n for n, _ in model.named_parameters()}
            if unknown:
                raise UnisegError(f"trainable weights name unknown parameters: {sorted(unknown)[:3]}")
            for name, parameter in model.named_parameters():
                parameter.requires_grad_(name in self.masks)
        self.remember(model)
        return self

    def remember(self, model: UniSeg) -> None:
        """Keep the frozen parts of partly trainable weights as they are now."""
        self._kept = []
        if self.masks is None:
            return
        parameters = dict(model.named_parameters())
        for name, mask in self.masks.items():
            if mask is not None:
                parameter = parameters[name]
                mask = mask.to(parameter.device)
                self._kept.append((parameter, mask, parameter.detach().clone()))

    @torch.no_grad()
    def restore(self) -> None:
        for parameter, mask, kept in self._kept:
            parameter.copy_(torch.where(mask, parameter, kept))

    def freeze_encoder(self, model: UniSeg, frozen: bool) -> None:
        """``--freeze-encoder``: the encoder's weights get no gradient (so SGD skips them) while frozen."""
        for name, parameter in model.named_parameters():
            if name.startswith("conv_blocks_context."):
                trains = self.masks is None or name in self.masks
                parameter.requires_grad_(trains and not frozen)


# ------------------------------------------------------------------------------------- training
def poly_lr(initial: float, epoch: int, epochs: int, exponent: float = 0.9) -> float:
    return initial * (1 - epoch / epochs) ** exponent


def train(data_folder: str | Path, output: str | Path, *, config: UniSegConfig | None = None,
          options: TrainOptions = TrainOptions(), preset: str = "published",
          init_state: dict[str, torch.Tensor] | None = None, trainable: Trainable | None = None,
          on_epoch_end: Callable[[int], None] | None = None, tasks: Sequence[TaskData] | None = None) -> TrainResult:
    """Train on a pre-processed folder into ``output``; see the module docstring for what is written.

    ``init_state`` starts from these weights instead of a random initialisation (fine-tuning);
    ``trainable`` limits what trains (see ``Trainable``); ``tasks`` is the folder's plan when the
    caller has read it already.
    """
    output = Path(output)
    tasks = list(tasks) if tasks is not None else read_plan(data_folder)
    dist_info = _distributed_from_env()
    device = _training_device(options.device, dist_info)
    state_path = output / STATE_NAME
    if options.resume and not state_path.exists():
        raise UsageError(f"{output}: nothing to resume ({STATE_NAME} is missing)")
    if not options.resume and state_path.exists():
        raise UsageError(f"{output}: holds a training run; continue it with --resume or choose another folder")
    if not options.resume and output.is_dir() and any(output.iterdir()):
        raise UsageError(f"{output}: folder exists and is not empty; choose another output folder")
    if options.epochs < 1 or options.batches_per_task < 1 or options.batch_size < 1:
        raise UsageError("--epochs, --batches-per-task and --batch-size must be at least 1")

    state = _load_state(state_path, device) if options.resume else None
    if state is not None:
        config = UniSegConfig.from_dict(json.loads(state["config"]))
    config = config or training_config(tasks, preset)
    if not options.augment and config.mirror_axes and state is None:
        log.info("no augmentation: the model never sees a mirrored patch, so its config records no mirror axes "
                 "and predict's TTA will not flip it")
        config = config.with_changes(mirror_axes=())
    tasks = _model_tasks(tasks, config)
    if options.freeze_encoder_epochs and dist_info.world > 1:
        raise UsageError("--freeze-encoder is not available under torchrun (DDP cannot change which weights train)")

    if dist_info.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _run(tasks, output, config, options, device, dist_info, state, on_epoch_end, init_state, trainable)
    finally:
        if dist_info.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _model_tasks(tasks: list[TaskData], config: UniSegConfig) -> list[TaskData]:
    """The pre-processed tasks with the model's numbering; each must be a model task with the same
    channels and spacing (a fine-tuned model may have more tasks than are trained)."""
    by_key = {t.key: t for t in config.tasks}
    matched = []
    for data in tasks:
        task = by_key.get(data.task.key)
        if task is None:
            raise UsageError(f"the model has no task {data.task.key!r} (its tasks: {', '.join(by_key)})")
        if task.channels != data.task.channels or task.target_spacing != data.task.target_spacing \
                or task.labels[:len(data.task.labels)] != data.task.labels:
            raise UsageError(f"task {task.key!r}: the model's channels, spacing or labels differ from the "
                             "pre-processed data's; pre-process for this model")
        matched.append(replace(data, task=task))
    return matched


def _training_device(spec: str, dist_info: Distributed) -> torch.device:
    device = pick_device(spec)
    if device.type == "cuda" and dist_info.world > 1:
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    return device


@dataclass
class _Run:
    """Everything one training run holds between epochs (built by ``_setup``)."""

    tasks: list[TaskData]
    output: Path
    config: UniSegConfig
    options: TrainOptions
    device: torch.device
    dist_info: Distributed
    chosen: list[tuple[list[str], list[str]]]
    model: UniSeg
    network: torch.nn.Module
    guard: Trainable
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: EpochSampler
    loader: torch.utils.data.DataLoader
    records: list[dict[str, Any]]
    precision: str = "fp32"
    start_epoch: int = 0
    best: float | None = None
    best_epoch: int | None = None

    @property
    def has_validation(self) -> bool:
        return any(val for _, val in self.chosen)


def _run(tasks: list[TaskData], output: Path, config: UniSegConfig, options: TrainOptions, device: torch.device,
         dist_info: Distributed, state: dict[str, Any] | None,
         on_epoch_end: Callable[[int], None] | None, init_state: dict[str, torch.Tensor] | None,
         trainable: Trainable | None) -> TrainResult:
    run = _setup(tasks, output, config, options, device, dist_info, state, init_state, trainable)
    loss = math.nan
    for epoch in range(run.start_epoch, options.epochs):
        record, loss, validated = _epoch(run, epoch)
        if dist_info.main:
            _checkpoint(run, epoch, record, validated)
        if dist_info.world > 1:
            dist.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
    return _finish(run, loss)


def _setup(tasks: list[TaskData], output: Path, config: UniSegConfig, options: TrainOptions, device: torch.device,
           dist_info: Distributed, state: dict[str, Any] | None, init_state: dict[str, torch.Tensor] | None,
           trainable: Trainable | None) -> _Run:
    """Splits, network, optimiser (restored from ``state`` when resuming), output files, data loader."""
    splits = read_splits(options.split_file, tasks) if options.split_file else make_splits(tasks, options.folds)
    chosen = select_fold(splits, tasks, options.fold)
    torch.manual_seed(options.seed)
    model = UniSeg(config).to(device)
    if init_state is not None:
        model.load_state_dict(init_state)
    model.train()
    guard = (trainable or Trainable()).apply(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=options.learning_rate,
                                momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=True)
    precision = resolve_training_precision(options.precision, device)
    model.set_channels_last(channels_last(precision, device))  # the layout inference at this precision uses
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    start_epoch, best, best_epoch = 0, None, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best, best_epoch = int(state["epoch"]), state["best_dice"], state["best_epoch"]
        torch.set_rng_state(state["torch_rng"].cpu())
        guard.remember(model)
        if start_epoch >= options.epochs:
            raise UsageError(f"{output}: already trained {start_epoch} epochs; raise --epochs to train more")
        log.info("resuming %s after epoch %d of %d", output, start_epoch, options.epochs)
    network: torch.nn.Module = model
    if dist_info.world > 1:
        # each batch uses one input convolution and one task's prompt slice: the others get no gradient
        network = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    if dist_info.main:
        make_folder(output)
        write_text(output / SPLITS_NAME, json.dumps(splits, indent=2) + "\n")
        write_text(output / "config.json", config.to_json())
    records = _read_log(output / LOG_NAME, before=start_epoch) if state is not None else []
    if dist_info.main:
        write_text(output / LOG_NAME, "".join(json.dumps(r) + "\n" for r in records))

    sampler = EpochSampler(len(tasks), options.batches_per_task, options.seed, dist_info.rank, dist_info.world)
    batches = PatchBatches(tasks, [train for train, _ in chosen], config.patch_size, options.batch_size,
                           options.seed, SpatialOptions() if options.augment else None)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=sampler, num_workers=options.workers,
                                         pin_memory=device.type == "cuda", persistent_workers=options.workers > 0,
                                         worker_init_fn=_worker_init)
    run = _Run(tasks, output, config, options, device, dist_info, chosen, model, network, guard, optimizer, scaler,
               sampler, loader, records, precision, start_epoch, best, best_epoch)
    log.info("training %d task(s) on %s%s (%s): %d epochs × %d batches (%d per task) of %d patch(es) %s, fold %s, "
             "validation %s", len(tasks), device, f" × {dist_info.world} ranks" if dist_info.world > 1 else "",
             precision,
             options.epochs, len(sampler) * dist_info.world, options.batches_per_task, options.batch_size,
             "×".join(map(str, config.patch_size)), options.fold,
             ", ".join(f"{t.task.key} {len(v)}" for t, (_, v) in zip(tasks, chosen)) if run.has_validation else "none")
    return run


def _epoch(run: _Run, epoch: int) -> tuple[dict[str, Any], float, bool]:
    """Train one epoch and validate when due; returns the log record, the mean loss, whether it validated."""
    options, dist_info = run.options, run.dist_info
    started = time.perf_counter()
    lr = poly_lr(options.learning_rate, epoch, options.epochs)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.sampler.set_epoch(epoch)
    encoder_frozen = epoch < options.freeze_encoder_epochs
    run.guard.freeze_encoder(run.model, encoder_frozen)
    losses = []
    class_dice: dict[int, list[torch.Tensor]] = {}  # kept on the device: one transfer per epoch, not per step
    with counting_bar(f"epoch {epoch + 1}/{options.epochs}", len(run.sampler),
                      enabled=options.progress and dist_info.main) as advance:
        for batch in run.loader:
            loss, dice = _step(run.network, run.optimizer, run.scaler, batch, run.tasks, run.config, run.device,
                               options.augment, AUTOCAST_DTYPES.get(run.precision))
            losses.append(loss)
            class_dice.setdefault(int(batch["task"]), []).append(dice)
            run.guard.restore()
            advance(1)
    loss = _mean_over_ranks(float(np.mean(losses)), run.device, dist_info)
    record: dict[str, Any] = {"epoch": epoch + 1, "loss": round(loss, 6), "lr": lr,
                              "seconds": round(time.perf_counter() - started, 3), "precision": run.precision,
                              "train_dice": _train_dice(run.tasks, class_dice)}
    if encoder_frozen:
        record["encoder_frozen"] = True
    validate = run.has_validation and ((epoch + 1) % options.val_every == 0 or epoch + 1 == options.epochs)
    if validate and dist_info.main:
        dice = validation_dice(run.model, run.tasks, [val for _, val in run.chosen], run.device, run.precision)
        record["dice"] = dice
        scores = [d for per_task in dice.values() for d in per_task.values() if d is not None]
        record["mean_dice"] = round(float(np.mean(scores)), 6) if scores else None
        if record["mean_dice"] is not None and (run.best is None or record["mean_dice"] > run.best):
            run.best, run.best_epoch = record["mean_dice"], epoch + 1
            save_model(run.model, run.output / BEST_FOLDER, overwrite=True)
    return record, loss, validate


def _train_dice(tasks: Sequence[TaskData], class_dice: dict[int, list[torch.Tensor]]) -> dict[str, dict[str, float]]:
    """The epoch's mean soft Dice per task and class (region) on its training patches (this rank's): a
    class stuck near 0 while the others rise is a class the recipe does not learn."""
    result = {}
    for index, values in sorted(class_dice.items()):
        task = tasks[index].task
        names = [s.name for s in task.label_manager.scored]
        means = torch.stack(values).float().mean(0).cpu().tolist()
        result[task.key] = {name: round(v, 4) for name, v in zip(names, means)}
    return result


def _checkpoint(run: _Run, epoch: int, record: dict[str, Any], validated: bool) -> None:
    """Rank 0, after each epoch: the resumable state, the log line, and the curves when they changed."""
    options, output = run.options, run.output
    _save_state(output / STATE_NAME, run.model, run.optimizer, run.scaler, run.config, epoch + 1, run.best,
                run.best_epoch)
    run.records.append(record)
    with open(output / LOG_NAME, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    log.info("epoch %d/%d: loss %.4f, lr %.5f, %.1f s%s", epoch + 1, options.epochs, record["loss"], record["lr"],
             record["seconds"], f", mean Dice {record['mean_dice']:.4f}" if record.get("mean_dice") is not None else "")
    if validated or epoch + 1 == options.epochs:
        _plot(run.records, output / PLOT_NAME)


def _finish(run: _Run, loss: float) -> TrainResult:
    """The final weights (and best/ when nothing was validated), the log's end record."""
    checksums = _weight_checksums(run.model, run.device, run.dist_info)
    output, options = run.output, run.options
    if run.dist_info.main:
        with atomic_file(output / "model.safetensors", suffix=".safetensors") as tmp:
            write_weights(run.model, tmp)
        if not run.has_validation:
            save_model(run.model, output / BEST_FOLDER, overwrite=True)  # nothing to choose by: the final weights
        end = {"event": "end", "epochs": options.epochs, "best_dice": run.best, "best_epoch": run.best_epoch,
               "weights_checksum_per_rank": checksums}
        with open(output / LOG_NAME, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(end) + "\n")
        log.info("model written to %s (final weights; best validation in %s/)", output, BEST_FOLDER)
    if run.dist_info.world > 1:
        # the other ranks wait for rank 0's files: a rank that tears down its process group while
        # rank 0 still writes can abort in gloo's teardown ("terminate called"), failing a finished run
        dist.barrier()
    return TrainResult(output, options.epochs, loss, run.best, run.best_epoch, run.records)


def _worker_init(worker: int) -> None:
    """Loader workers take Ctrl-C the default way (torch ends them quietly); the CLI's own handler, which
    a forked worker inherits, is for the training process."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _step(network: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
          batch: dict[str, Any], tasks: list[TaskData], config: UniSegConfig, device: torch.device,
          augment: bool, autocast: torch.dtype | None) -> tuple[float, torch.Tensor]:
    """One optimiser step (under ``autocast`` unless None); the loss and the finest output's soft Dice per
    class (region) of the batch."""
    task = tasks[int(batch["task"])].task
    images, labels = augment_batch(batch, device, config.patch_size, augment=augment, mirror_axes=config.mirror_axes)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext():
        outputs = network(images, task.id)
        loss, dice = deep_supervision_loss(outputs, labels, task)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(network.parameters(), GRADIENT_CLIP)
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach()), dice


@torch.no_grad()
def validation_dice(model: UniSeg, tasks: Sequence[TaskData], cases: Sequence[Sequence[str]],
                    device: torch.device, precision: str = "auto") -> dict[str, dict[str, float | None]]:
    """Dice per task and class (per region for a region task) over the held-out cases (voxel counts
    summed over cases), from the sliding window of ``predict`` without mirroring, at the pre-processed
    resolution; at the training's ``precision``, so that the network keeps the layout it trains in.

    A class absent from both prediction and reference in every case has no Dice (None).
    """
    model.eval()
    window = WindowOptions(step=0.5, mirror=False, precision=precision)
    try:
        result = {}
        for data, names in zip(tasks, cases):
            task = data.task
            manager = task.label_manager
            names_scored = [s.name for s in manager.scored]
            tp, fp, fn = (np.zeros(len(names_scored)) for _ in range(3))
            for name in names:
                image = torch.from_numpy(np.array(data.image(name))).to(device)
                probabilities = sliding_window(model, image, heads([task]), window)[0]
                reference = np.asarray(data.labels(name))
                if manager.has_regions:  # each region's own sigmoid, as nnU-Net validates regions
                    predicted_masks = list((probabilities > 0.5).cpu().numpy())
                else:
                    predicted_masks = manager.masks(probabilities.argmax(0).cpu().numpy())
                reference_masks = manager.masks(reference)
                for i, (p, r) in enumerate(zip(predicted_masks, reference_masks)):
                    tp[i] += np.count_nonzero(p & r)
                    fp[i] += np.count_nonzero(p & ~r)
                    fn[i] += np.count_nonzero(~p & r)
            result[task.key] = {
                label: (round(float(2 * tp[i] / (2 * tp[i] + fp[i] + fn[i])), 6) if tp[i] + fp[i] + fn[i] else None)
                for i, label in enumerate(names_scored)
            }
        return result
    finally:
        model.train()


def _mean_over_ranks(value: float, device: torch.device, dist_info: Distributed) -> float:
    if dist_info.world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist_info.world


def _weight_checksums(model: UniSeg, device: torch.device, dist_info: Distributed) -> list[float]:
    """Sum of every weight, per rank: DDP keeps the ranks identical, and the log shows it."""
    local = torch.tensor([sum(float(p.detach().double().sum()) for p in model.parameters())],
                         dtype=torch.float64, device=device)
    if dist_info.world == 1:
        return [float(local.item())]
    gathered = [torch.zeros_like(local) for _ in range(dist_info.world)]
    dist.all_gather(gathered, local)
    return [float(t.item()) for t in gathered]


# ----------------------------------------------------------------------------------- files
def _save_state(path: Path, model: UniSeg, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                config: UniSegConfig, epoch: int, best: float | None, best_epoch: int | None) -> None:
    state = {
        "epoch": epoch, "best_dice": best, "best_epoch": best_epoch, "config": config.to_json(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(),
    }
    with atomic_file(path, suffix=".pt") as tmp:
        torch.save(state, tmp)


def _load_state(path: Path, device: torch.device) -> dict[str, Any]:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable state is one message
        raise UnisegError(f"{path}: cannot read the training state ({exc})") from None


def _read_log(path: Path, *, before: int) -> list[dict[str, Any]]:
    """The epochs a resumed run keeps: those the saved state covers (a killed run may have logged more)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if "epoch" in r and r["epoch"] <= before and "event" not in r]


def _plot(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Loss and mean validation Dice per epoch as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, loss_axis = plt.subplots(figsize=(8, 4.5), dpi=100)
    epochs = [r["epoch"] for r in records]
    loss_axis.plot(epochs, [r["loss"] for r in records], color="tab:blue", label="training loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("loss (CE − Dice)")
    validated = [r for r in records if r.get("mean_dice") is not None]
    if validated:
        dice_axis = loss_axis.twinx()
        dice_axis.plot([r["epoch"] for r in validated], [r["mean_dice"] for r in validated], "o-",
                       color="tab:green", label="validation mean Dice")
        dice_axis.set_ylabel("mean Dice")
        dice_axis.set_ylim(0, 1)
    figure.legend(loc="upper right")
    figure.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)


__all__ = ["TrainOptions", "TrainResult", "Trainable", "train", "training_config", "make_splits", "validation_dice"]
