"""``uniseg export``: deployable copies of a model, each checked against PyTorch before it is kept.

- ``safetensors``: a clean model folder (float32, or float16 with ``half``) with a model card, the
  same format ``--model`` reads.
- ``torchscript``: ``uniseg_<N>ch.pt`` per accepted channel count, a traced module
  ``(image, task) → logits`` that ``torch.jit.load`` runs without uniseg.
- ``onnx``: ``uniseg_<N>ch.onnx`` per accepted channel count (opset 18): inputs ``image`` float32
  ``(batch, N, *patch_size)`` with a dynamic batch and ``task`` int64 ``(1,)``, output ``logits``
  ``(batch, num_classes, *patch_size)``; checked with ``onnx.checker`` and run with onnxruntime's CPU
  provider when it is installed.

With ``task`` the graph has the task built in and only the ``image`` input. The channel count picks
the first convolution (``conv_1``/``conv_2``/``conv_4``), so each count is its own graph. Every file
is run on a seeded random patch for every task it serves and compared with the PyTorch model; the
folder appears (atomically) only if the largest difference is within tolerance.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uniseg_cli.errors import UnisegError, UsageError
from uniseg_cli.io.atomic import atomic_directory, refuse_replacing_inputs
from uniseg_cli.model.files import load_model, write_model_files
from uniseg_cli.model.network import UniSeg
from uniseg_cli.tasks import Task, resolve_task
from uniseg_cli.weights.hub import CONFIG_NAME, WEIGHTS_NAME, resolve_model
from uniseg_cli.weights.model_card import model_card

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "torchscript", "onnx")
ONNX_OPSET = 18
#: Largest |exported − PyTorch| logit accepted: float32 files, and float16 weights.
TOLERANCE = {"float32": 1e-3, "float16": 5e-2}


class ExportError(UnisegError):
    """An export that could not be made or did not reproduce the PyTorch model."""


class TaskLogits(nn.Module):
    """``(image, task) → logits`` for export: the task's prompt map is picked by a tensor index, so
    one graph serves every task; with ``fixed_task`` the graph takes only the image."""

    def __init__(self, model: UniSeg, fixed_task: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.fixed_task = fixed_task

    def forward(self, image: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        features = self.model.encode(image)
        maps = self.model.task_maps(features[-1])
        if maps is None:  # a downstream model: no prompt, one task
            return self.model.decode_with_map(features, None)  # type: ignore[return-value]
        if self.fixed_task is not None:
            task_map = maps[:, self.fixed_task:self.fixed_task + 1]
        else:
            task_map = maps.index_select(1, task.reshape(1))  # type: ignore[union-attr]
        return self.model.decode_with_map(features, task_map)  # type: ignore[return-value]


@dataclass
class ExportReport:
    """What was written and how closely each file reproduced the PyTorch model."""

    format: str
    output: Path
    files: list[str]
    max_abs_diff: dict[str, float] = field(default_factory=dict)   # "file:task" → difference
    unchecked: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "output": str(self.output), "files": self.files,
                "max_abs_diff": self.max_abs_diff, "unchecked": self.unchecked}


def export_model(spec: str, fmt: str, output: str | Path | None = None, *, task: str | None = None,
                 channels: int | None = None, half: bool = False, force: bool = False) -> ExportReport:
    """Export the model ``spec`` names; see the module docstring. Returns the report of the checks."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if half and fmt != "safetensors":
        raise UsageError("--half applies to --format safetensors only")
    source = resolve_model(spec).path
    model = load_model(source)
    config = model.config
    chosen = resolve_task(task, config.tasks) if task is not None else None
    if channels is not None and channels not in config.input_channels:
        raise UsageError(f"--channels {channels}: the model takes {', '.join(map(str, config.input_channels))}")
    if chosen is not None and channels is not None and channels != len(chosen.channels):
        raise UsageError(f"task {chosen.key!r} takes {len(chosen.channels)} channel(s), not {channels}")
    if chosen is not None and channels is None:
        channels = len(chosen.channels)
    output = Path(output) if output is not None else Path(f"{source.resolve().name}-{fmt}")
    if output.resolve() == source.resolve() or source.resolve() in output.resolve().parents:
        raise UsageError(f"{output}: is the source model folder (or inside it); choose another output")
    refuse_replacing_inputs(output, (source,))  # --force would delete a source model inside the output
    output = output if output.name else output.resolve()
    counts = [channels] if channels is not None else list(config.input_channels)
    # what an export writes, so that --force also replaces an export made before folders had a manifest
    ours = [CONFIG_NAME, WEIGHTS_NAME, "README.md"] + [f"uniseg_{c}ch.{e}" for c in config.input_channels
                                                       for e in ("pt", "onnx")]
    with atomic_directory(output, overwrite=force, ours=ours) as tmp:
        report = ExportReport(fmt, output, [])
        if fmt == "safetensors":
            _export_safetensors(model, tmp, half, report, chosen)
        else:
            for count in counts:
                name = f"uniseg_{count}ch." + ("pt" if fmt == "torchscript" else "onnx")
                # a model without the prompt has one task and no use for a task input
                fixed = chosen.id if chosen else (None if config.prompted else 0)
                wrapper = TaskLogits(model, fixed).eval()
                (_export_torchscript if fmt == "torchscript" else _export_onnx)(wrapper, tmp / name, count, config.patch_size)
                report.files.append(name)
                _check_file(fmt, tmp / name, model, count, _tasks_for(config.tasks, count, chosen), fixed is not None, report)
            (tmp / CONFIG_NAME).write_text(config.to_json(), encoding="utf-8")
            report.files.append(CONFIG_NAME)
    return report


def _tasks_for(tasks: tuple[Task, ...], count: int, chosen: Task | None) -> list[Task]:
    """The tasks a file serves: the chosen one, else those taking ``count`` channels (else the first task,
    so that every file is checked)."""
    if chosen is not None:
        return [chosen]
    return [t for t in tasks if len(t.channels) == count] or [tasks[0]]


def _patch(count: int, patch_size: tuple[int, int, int], batch: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(count)
    return torch.randn(batch, count, *patch_size, generator=generator)


# ------------------------------------------------------------------------------------ formats
def _export_safetensors(model: UniSeg, folder: Path, half: bool, report: ExportReport, chosen: Task | None) -> None:
    write_model_files(model, folder, dtype=torch.float16 if half else torch.float32)
    parameters = sum(p.numel() for p in model.parameters())
    (folder / "README.md").write_text(model_card(model.config, repo=report.output.name, parameters=parameters),
                                      encoding="utf-8")
    report.files += [CONFIG_NAME, WEIGHTS_NAME, "README.md"]
    exported = load_model(folder)
    tolerance = TOLERANCE["float16" if half else "float32"]
    for count in model.config.input_channels:
        x = _patch(count, model.config.patch_size)
        with torch.inference_mode():
            ours, theirs = model.encode(x), exported.encode(x)
            our_maps, their_maps = model.task_maps(ours[-1]), exported.task_maps(theirs[-1])
            for task in _tasks_for(model.config.tasks, count, chosen):
                diff = (exported.decode(theirs, task.id, their_maps) - model.decode(ours, task.id, our_maps)).abs().max()
                _record(report, f"{WEIGHTS_NAME}:{task.key}:{count}ch", float(diff), tolerance)


def _export_torchscript(wrapper: TaskLogits, path: Path, count: int, patch_size: tuple[int, int, int]) -> None:
    example = (_patch(count, patch_size),) + (() if wrapper.fixed_task is not None else (torch.zeros(1, dtype=torch.long),))
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the shape checks run once, at trace time
        warnings.simplefilter("ignore", DeprecationWarning)       # torch ≥ 2.10 deprecates TorchScript; it still works
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    traced.save(str(path))


def _export_onnx(wrapper: TaskLogits, path: Path, count: int, patch_size: tuple[int, int, int]) -> None:
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'uniseg-cli[export]'") from None
    fixed = wrapper.fixed_task is not None
    args = (_patch(count, patch_size, batch=2),) + (() if fixed else (torch.zeros(1, dtype=torch.long),))
    batch = torch.export.Dim("batch", min=1, max=1024)
    shapes = {"image": {0: batch}} if fixed else {"image": {0: batch}, "task": None}
    # the exporter reports progress on stdout and logs every pass: stdout carries only data in uniseg
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    # and it warns once per graph that torchvision's detection operators are not registered: this
    # network uses none of them
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(wrapper, args, input_names=["image"] if fixed else ["image", "task"],
                                        output_names=["logits"], opset_version=ONNX_OPSET, dynamo=True,
                                        dynamic_shapes=(shapes["image"],) if fixed else (shapes["image"], None),
                                        external_data=False, verbose=False)
        except Exception as exc:  # noqa: BLE001 - the exporter fails in many ways; one line says which
            raise ExportError(f"{path.name}: torch's ONNX exporter failed ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    program.save(str(path))
    onnx.checker.check_model(str(path), full_check=True)


# ------------------------------------------------------------------------------------ checking
def _check_file(fmt: str, path: Path, model: UniSeg, count: int, tasks: list[Task], fixed: bool,
                report: ExportReport) -> None:
    x = _patch(count, model.config.patch_size)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            loaded = torch.jit.load(str(path))

        def run(task: Task) -> torch.Tensor:
            with torch.no_grad():
                return loaded(x) if fixed else loaded(x, torch.tensor([task.id]))
    else:
        try:
            import onnxruntime
        except ImportError:
            log.warning("%s: onnxruntime is not installed, so the ONNX file was checked by onnx.checker only, not "
                        "run (pip install 'uniseg-cli[export]')", path.name)
            report.unchecked.append(path.name)
            return
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run(task: Task) -> torch.Tensor:
            feed = {"image": x.numpy()} if fixed else {"image": x.numpy(), "task": torch.tensor([task.id]).numpy()}
            return torch.from_numpy(session.run(["logits"], feed)[0])
    with torch.inference_mode():
        features = model.encode(x)
        maps = model.task_maps(features[-1])
        for task in tasks:
            reference = model.decode(features, task.id, maps)
            _record(report, f"{path.name}:{task.key}", float((run(task) - reference).abs().max()), TOLERANCE["float32"])


def _record(report: ExportReport, key: str, diff: float, tolerance: float) -> None:
    report.max_abs_diff[key] = diff
    log.info("%s: max |exported - pytorch| = %.3g", key, diff)
    if not diff <= tolerance:
        raise ExportError(f"{key}: the exported model differs from PyTorch by {diff:.3g} (tolerance {tolerance:g}); "
                          "nothing was written")
