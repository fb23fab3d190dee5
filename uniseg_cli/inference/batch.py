"""Running the predictor over many cases: one model load, per-case errors, resumable, shardable."""

from __future__ import annotations

import logging
import sys
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from uniseg_cli.config import ALL_AXES
from uniseg_cli.errors import UnisegError, UsageError, first_line
from uniseg_cli.inference.cases import Case, collect_cases, output_path, select_shard
from uniseg_cli.inference.phases import CaseResult, Prediction, PreparedCase
from uniseg_cli.inference.predictor import ALL_TASKS, Segmenter
from uniseg_cli.inference.schedulers import parse_shard
from uniseg_cli.inference.sliding_window import WindowOptions
from uniseg_cli.io.atomic import make_folder
from uniseg_cli.outputs.formats import OutputOptions, check_options
from uniseg_cli.outputs.plan import CasePlan, check_plans
from uniseg_cli.outputs.record import read_record
from uniseg_cli.outputs.run_report import RunReport, run_report_path
from uniseg_cli.outputs.statistics import write_statistics_table
from uniseg_cli.progress import on_terminal, stderr_progress
from uniseg_cli.quality.postprocess import parse_postprocessing

log = logging.getLogger(__name__)

# Whatever goes wrong with one case fails that case only: its error line and JSON record, then the next
# case. Ctrl-C and SIGTERM are BaseExceptions and still stop the batch.
CASE_ERRORS = (Exception,)


def run_batch(arguments: Sequence[str], stdin: Iterable[str], *, task: str, model: str | None, output: Path | None,
              device: str, window: WindowOptions, probabilities: str | None, modality: str | None,
              shard: str | None, skip_existing: bool, emit: Callable[[CaseResult], None] | None,
              progress: bool, max_memory: int | None = None, allow_gaps: bool = False,
              outputs: OutputOptions = OutputOptions(), statistics_csv: Path | None = None,
              accept_implausible: bool = False, keep_largest: str | None = None,
              min_component_ml: float | None = None, fail_on: frozenset[str] = frozenset()) -> int:
    """Segment every case; returns the number of failed cases (each reported on stderr and to ``emit``),
    a case flagged with a ``fail_on`` code among them (its outputs are written)."""
    every = collect_cases(arguments, stdin)
    if not every:
        raise UsageError("no cases to segment")
    where = parse_shard(shard)
    if where is not None and where.source != "--shard":
        log.info("shard %s from the environment: %s", where.spec, where.source)
    cases = select_shard(every, where)
    if not cases:  # a job array with more jobs than cases: nothing to do is not an error
        log.info("no cases in shard %s (%d case(s) in all)", where.spec if where else shard, len(every))
        return 0
    if where is not None and where.local_rank is not None and device == "auto":
        import torch

        if torch.cuda.is_available():  # one process per GPU of the node
            device = f"cuda:{where.local_rank % torch.cuda.device_count()}"
    check_options(outputs, [all(p.is_dir() for p in case.channels) for case in cases])
    single, single_batch = len(cases) == 1, len(every) == 1
    if outputs.split and output is not None and single and output_path(cases[0], "x", output, single=True,
                                                                       fmt=outputs.formats[0]) == output:
        raise UsageError(f"{output}: --split writes one file per task; give a folder")
    if outputs.preview_path is not None and not single:
        raise UsageError(f"--preview-file {outputs.preview_path}: names one file, but there are several cases; "
                         "use --preview (each case gets <output>_preview.png)")
    if skip_existing and not outputs.sidecar:
        raise UsageError("--skip-existing needs the case record (<name>.json) that --no-sidecar turns off: it is "
                         "how a finished case is told from a half-written one")
    segmenter = Segmenter(model, device=device, window=window, max_memory=max_memory)
    segmenter.postprocessing = parse_postprocessing(keep_largest, min_component_ml, segmenter.label_names())
    outputs = replace(outputs, disagreement=outputs.uncertainty and segmenter.mirrored)
    if "low_confidence" in fail_on and not outputs.uncertainty:
        raise UsageError("--fail-on low_confidence needs --uncertainty (confidence comes from the probabilities)")
    key = segmenter.task_key(task)
    if outputs.split and skip_existing and key == ALL_TASKS:
        raise UsageError("--skip-existing with --split needs a task list (the files a case gets from 'all' "
                         "depend on its channels)")
    # every case of the batch, all shards: their files must not collide with each other or any input
    plans = {case: segmenter.plan(case, task, output_path(case, key, output, single=single_batch,
                                                          fmt=outputs.formats[0]),
                                  options=outputs, probabilities=probabilities) for case in every}
    folder_output = output is not None and not (single and next(iter(plans.values())).primary == output)
    # a shard's run report (docs/cohorts.md): beside the outputs, named by the shard
    report_file = (run_report_path(output if folder_output else Path.cwd(), where.name)  # type: ignore[arg-type]
                   if where is not None else None)
    others = [(statistics_csv, "the --statistics-csv table")] if statistics_csv else []
    others += [(report_file, "the run report")] if report_file else []
    check_plans(list(plans.values()), others)
    todo_plans = [plans[case] for case in cases]
    if folder_output:
        make_folder(output)  # type: ignore[arg-type]
    options = segmenter.window
    log.info("%d case(s), task %s, model %s on %s (%s, TTA %s, step %g)", len(todo_plans), key,
             segmenter.model_name + (" (default)" if model is None else ""),
             segmenter.device, options.precision_label, _tta(options.mirror, segmenter.model.config.mirror_axes), options.step)
    records: dict[str, dict] = {}
    run_report = None
    if report_file is not None:
        run_report = RunReport(report_file, model=segmenter.model_name, model_file=segmenter.weights_file,
                               device=str(segmenter.device), precision=options.precision_label,
                               shard={"index": where.index, "count": where.count, "source": where.source}
                               if where else None, cases=len(todo_plans),
                               settings={"task": task, "step": options.step, "tta": options.mirror,
                                         "batch_size": options.batch_size, "output": str(output),
                                         "formats": list(outputs.formats), "split": outputs.split,
                                         "statistics": outputs.statistics, "preview": outputs.preview,
                                         "uncertainty": outputs.uncertainty, "probabilities": probabilities,
                                         "skip_existing": skip_existing, "accept_implausible": accept_implausible,
                                         "fail_on": sorted(fail_on), "modality": modality, "allow_gaps": allow_gaps,
                                         "postprocessing": segmenter.postprocessing.to_json()})
        run_report.write()
    if statistics_csv is not None or run_report is not None:  # rows of the cases run now; the run report
        inner = emit
        def emit(result: CaseResult) -> None:
            records[result.case] = result.to_json()
            if run_report is not None:
                run_report.add(result)
            if inner is not None:
                inner(result)
    pipeline = _Pipeline(segmenter, key, task, probabilities=probabilities, modality=modality, allow_gaps=allow_gaps,
                         outputs=outputs, emit=emit, accept_implausible=accept_implausible, fail_on=fail_on)
    with _Progress(enabled=on_terminal(progress)) as bar, pipeline:
        skipped = set()
        if skip_existing:
            for plan in todo_plans:
                reason = plan.incomplete()
                if reason is None:
                    skipped.add(plan.case)
                elif plan.record is not None and (plan.record.exists() or plan.primary.exists()):
                    log.info("%s: redoing it, its earlier outputs are not complete (%s)", plan.case.name, reason)
        todo = [plan for plan in todo_plans if plan.case not in skipped]
        pipeline.prefetch(todo[0] if todo else None)
        upcoming = iter(todo[1:])
        for plan in todo_plans:
            case = plan.case
            if case in skipped:
                pipeline.done(CaseResult.of(case, key, output=str(plan.primary), skipped=True,
                                            flags=recorded_flags(plan)))
                continue
            prepared = pipeline.take(case)
            pipeline.prefetch(next(upcoming, None))  # read and pre-process the next case meanwhile
            if prepared is None:
                continue
            bar.start(case.name)
            try:
                prediction = segmenter.run(prepared.inputs, probabilities=probabilities is not None,
                                           split=outputs.split, uncertainty=outputs.uncertainty,
                                           on_progress=lambda done, total: (bar.update(done, total), pipeline.poll()))
            except CASE_ERRORS as exc:
                pipeline.failed(case, exc)
            else:
                pipeline.write(prepared, prediction)  # written in the background, reported in order
    if statistics_csv is not None:
        write_statistics_table(statistics_csv, list(plans.values()), records)
    if run_report is not None:
        run_report.finish()
    return pipeline.failures


class _Pipeline:
    """Prefetch (read + pre-process) the next case and write the last one while the network runs.

    Results are reported in input order; each failure is one ``Error:`` line and an error record.
    """

    def __init__(self, segmenter: Segmenter, key: str, task: str, *, probabilities: str | None, modality: str | None,
                 allow_gaps: bool, outputs: OutputOptions, emit: Callable[[CaseResult], None] | None,
                 accept_implausible: bool = False, fail_on: frozenset[str] = frozenset()) -> None:
        self.segmenter, self.key, self.task = segmenter, key, task
        self.accept_implausible, self.fail_on = accept_implausible, fail_on
        self.probabilities, self.modality, self.allow_gaps, self.emit = probabilities, modality, allow_gaps, emit
        self.outputs = outputs
        self.failures = 0
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="uniseg-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="uniseg-write")
        self._prefetched: dict[str, Future] = {}
        self._pending: deque[tuple[Case, Future]] = deque()

    def __enter__(self) -> _Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self._flush(block=True)
        finally:
            for future in self._prefetched.values():
                future.cancel()
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._writer.shutdown(wait=True)

    def prefetch(self, plan: CasePlan | None) -> None:
        if plan is not None:
            self._prefetched[plan.case.name] = self._reader.submit(
                self.segmenter.prepare_case, plan.case, self.task, plan, modality=self.modality,
                allow_gaps=self.allow_gaps, outputs=self.outputs, accept_implausible=self.accept_implausible)

    def take(self, case: Case) -> PreparedCase | None:
        try:
            return self._prefetched.pop(case.name).result()
        except CASE_ERRORS as exc:
            self.failed(case, exc)
            return None

    def write(self, prepared: PreparedCase, prediction: Prediction) -> None:
        self._pending.append((prepared.case, self._writer.submit(self._write, prepared, prediction)))
        while len(self._pending) > 2:  # bound the label maps waiting in memory
            self._report(*self._pending.popleft())
        self._flush(block=False)

    def _write(self, prepared: PreparedCase, prediction: Prediction) -> CaseResult:
        result = self.segmenter.export(prepared, prediction, outputs=self.outputs)
        log.info("%s -> %s (%.1f s)", prepared.case.name, result.output, result.seconds)
        return result

    def done(self, result: CaseResult) -> None:
        self._pending.append((None, _finished(result)))  # type: ignore[arg-type]
        self._flush(block=False)

    def failed(self, case: Case, exc: BaseException) -> None:
        self._pending.append((case, _finished(exc)))
        self._flush(block=False)

    def poll(self) -> None:
        """Report what has finished meanwhile (called between network passes: the previous case's record
        and run-report entry appear as soon as it is written, not when the next case is)."""
        self._flush(block=False)

    def _flush(self, *, block: bool) -> None:
        """Report finished results in input order; with ``block``, wait for all of them."""
        while self._pending and (block or self._pending[0][1].done()):
            self._report(*self._pending.popleft())

    def _report(self, case: Case, future: Future) -> None:
        try:
            result = future.result()
        except CASE_ERRORS as exc:
            result = self._error(case, exc)
        if isinstance(result, BaseException):
            result = self._error(case, result)
        elif self.fail_on and result.flags:
            hits = [f for f in result.flags if f["code"] in self.fail_on]
            if hits:
                self.failures += 1
                result.failed_on = sorted({f["code"] for f in hits})
                print(f"Error: {result.case}: flagged {hits[0]['code']}: {hits[0]['reason']}"
                      + (f" (and {len(hits) - 1} more)" if len(hits) > 1 else "") + "; counted as failed (--fail-on)",
                      file=sys.stderr)
        if self.emit is not None:
            self.emit(result)

    def _error(self, case: Case, exc: BaseException) -> CaseResult:
        self.failures += 1
        message = str(exc) if isinstance(exc, UnisegError) else f"{case.channels[0]}: {_describe(exc)}"
        if not isinstance(exc, (UnisegError, OSError, MemoryError)):  # unexpected: a uniseg bug, shown with -v
            log.debug("%s failed", case.name, exc_info=(type(exc), exc, exc.__traceback__))
        print(f"Error: {message}", file=sys.stderr)
        return CaseResult.of(case, self.key, error=message)


def recorded_flags(plan: CasePlan) -> list[dict] | None:
    """The flags a finished case's record holds (a skipped case flagged then still fails ``--fail-on``)."""
    record = read_record(plan.record) if plan.record is not None else None
    flags = ((record or {}).get("result") or {}).get("flags")
    return flags if isinstance(flags, list) else None


def _finished(value: object) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _tta(mirror: bool, axes: tuple[int, ...]) -> str:
    """How the log names the TTA: on, off, or the axes a model restricts it to (its ``mirror_axes``)."""
    if not mirror:
        return "off"
    if not axes:
        return "off: the model allows no mirroring (trained without it)"
    flips = 2 ** len(axes)
    if axes == ALL_AXES:
        return f"on, {flips} flips"
    return f"on, {flips} flips of {'+'.join('zyx'[a] for a in axes)} only (the model's mirror axes)"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    return f"{type(exc).__name__}: {first_line(exc)}"


class _Progress:
    """A rich progress bar over the network passes (tiles × mirrors) of the current case, with the time
    left, on stderr, only on a terminal."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._progress = None
        self._task = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            self._progress = stderr_progress("passes")
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
