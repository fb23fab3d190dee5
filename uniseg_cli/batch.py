"""Running the predictor over many cases: one model load, per-case errors, resumable, shardable."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from uniseg_cli.cases import collect_cases, output_path, refuse_overwriting_inputs, select_shard
from uniseg_cli.errors import UnisegError, UsageError
from uniseg_cli.predictor import CaseResult, Segmenter
from uniseg_cli.sliding_window import WindowOptions

log = logging.getLogger(__name__)

#: Failures that belong to one case; anything else is a bug and stops the batch with a traceback.
CASE_ERRORS = (UnisegError, OSError, MemoryError, torch.OutOfMemoryError)


def run_batch(arguments: Sequence[str], stdin: Iterable[str], *, task: str, model: str | None, output: Path | None,
              device: str, window: WindowOptions, probabilities: str | None, modality: str | None,
              shard: str | None, skip_existing: bool, emit: Callable[[CaseResult], None] | None,
              progress: bool) -> int:
    """Segment every case; returns the number of failed cases (each reported on stderr and to ``emit``)."""
    cases = select_shard(collect_cases(arguments, stdin), shard)
    if not cases:
        raise UsageError("no cases to segment" + (f" in shard {shard}" if shard else ""))
    segmenter = Segmenter(model, device=device, window=window)
    key = segmenter.task_key(task)
    plan = [(case, output_path(case, key, output, single=len(cases) == 1)) for case in cases]
    for case, target in plan:
        refuse_overwriting_inputs(case, target)
    if output is not None and not (len(cases) == 1 and plan[0][1] == output):
        _ensure_folder(output)
    log.info("%d case(s), task %s, model %s on %s", len(plan), key, model or "(default)", segmenter.device)
    failures = 0
    with _Progress(enabled=progress and sys.stderr.isatty()) as bar:
        for case, target in plan:
            if skip_existing and target.exists():
                result = CaseResult(case=case.name, inputs=[str(p) for p in case.channels], task=key,
                                    output=str(target), skipped=True)
            else:
                bar.start(case.name)
                try:
                    result = segmenter.predict_case(case, key, target, probabilities=probabilities,
                                                    modality=modality, on_tile=bar.update)
                except CASE_ERRORS as exc:
                    failures += 1
                    message = str(exc) if isinstance(exc, UnisegError) else f"{case.channels[0]}: {_describe(exc)}"
                    print(f"Error: {message}", file=sys.stderr)
                    result = CaseResult(case=case.name, inputs=[str(p) for p in case.channels], task=key,
                                        error=message)
                else:
                    log.info("%s -> %s (%.1f s)", case.name, target, result.seconds)
            if emit is not None:
                emit(result)
    return failures


def _ensure_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UnisegError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


class _Progress:
    """A rich progress bar over the tiles of the current case, on stderr, only on a terminal."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._progress = None
        self._task = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start(self, name: str) -> None:
        if self._progress is not None:
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task(name, total=None)

    def update(self, done: int, total: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=done, total=total)
