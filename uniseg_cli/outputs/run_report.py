"""The run report of one ``predict`` process (one shard): what ran, how, and what became of every case.

``uniseg-run_shard-2-of-3.json`` (shard 2 of 3, with ``--shard``) in the output folder: uniseg's and
torch's versions, the model's name and the SHA-256 of its weights, the device and precision actually
used, every setting, and each case of the shard with its outcome (written, skipped or failed with its
error line), seconds and the process's peak memory so far. It is rewritten atomically after every case,
so a shard killed by its scheduler leaves a report of what it finished. ``uniseg report`` merges the
shards' reports (``uniseg_cli.outputs.report``) and lists the failed cases for ``predict -``.
"""

from __future__ import annotations

import json
import platform
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Any

from uniseg_cli.io.atomic import write_text

RUN_REPORT_FORMAT = "uniseg-run-report"
RUN_REPORT_VERSION = 1
RUN_REPORT_PREFIX = "uniseg-run"


def run_report_path(folder: Path, shard_name: str) -> Path:
    return folder / f"{RUN_REPORT_PREFIX}_{shard_name}.json"


def is_run_report(path: Path) -> bool:
    return path.name.startswith(RUN_REPORT_PREFIX) and path.name.endswith(".json")


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1024), 1)  # bytes on macOS, KiB on Linux


class RunReport:
    """Collects a shard's cases and keeps ``path`` up to date."""

    def __init__(self, path: Path, *, model: str, model_file: Path | None, device: str, precision: str,
                 shard: dict[str, Any] | None, settings: dict[str, Any], cases: int) -> None:
        import torch

        from uniseg_cli import __version__
        from uniseg_cli.outputs.record import sha256

        self.path = path
        self.started = time.time()
        self.data: dict[str, Any] = {
            "format": RUN_REPORT_FORMAT, "version": RUN_REPORT_VERSION,
            "uniseg": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "host": socket.gethostname(),
            "model": {"name": model, "file": model_file.name if model_file else None,
                      "sha256": sha256(model_file) if model_file is not None and model_file.is_file() else None},
            "device": device, "precision": precision, "shard": shard, "settings": settings,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "finished": None, "planned_cases": cases, "cases": [],
        }

    def add(self, result: Any) -> None:
        """Record one case's outcome (a ``CaseResult``) and rewrite the report."""
        import torch

        outcome = "failed" if result.error is not None or result.failed_on else (
            "skipped" if result.skipped else "written")
        entry: dict[str, Any] = {"case": result.case, "inputs": [str(Path(p).absolute()) for p in result.inputs],
                                 "outcome": outcome,
                                 "output": result.output, "seconds": result.seconds if not result.skipped else None,
                                 "peak_rss_mb": _peak_rss_mb()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            entry["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / (1 << 20), 1)
            torch.cuda.reset_peak_memory_stats()
        if result.error is not None:
            entry["error"] = result.error
        if result.failed_on:
            entry["error"] = f"flagged {', '.join(result.failed_on)} (--fail-on)"
        self.data["cases"].append(entry)
        self.write()

    def finish(self) -> None:
        self.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.data["seconds"] = round(time.time() - self.started, 1)
        self.write()

    def write(self) -> None:
        write_text(self.path, json.dumps(self.data, indent=2) + "\n")


def read_run_report(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != RUN_REPORT_FORMAT or not isinstance(data.get("cases"), list):
        return None
    return data


def merge_run_reports(reports: list[tuple[Path, dict[str, Any]]]) -> dict[str, Any]:
    """One summary of several shards' reports: per case its latest outcome (a resubmitted shard's report
    replaces its earlier one; across reports the later start wins), the failed cases with their error."""
    latest: dict[str, tuple[str, dict[str, Any], str]] = {}
    shards = []
    for path, data in sorted(reports, key=lambda item: str(item[1].get("started"))):
        shards.append({"report": str(path), "shard": data.get("shard"), "host": data.get("host"),
                       "device": data.get("device"), "precision": data.get("precision"), "model": data.get("model"),
                       "started": data.get("started"), "finished": data.get("finished"),
                       "planned_cases": data.get("planned_cases"), "cases": len(data["cases"])})
        for entry in data["cases"]:
            if isinstance(entry, dict) and "case" in entry:
                latest[str(entry["case"])] = (str(entry.get("outcome")), entry, str(path))
    counts = {o: sum(1 for outcome, _, _ in latest.values() if outcome == o) for o in ("written", "skipped", "failed")}
    failed = [{"case": case, "inputs": entry.get("inputs", []), "error": entry.get("error"), "report": where}
              for case, (outcome, entry, where) in sorted(latest.items()) if outcome == "failed"]
    unfinished = [s["report"] for s in shards if not s["finished"]]
    models = {json.dumps(s["model"], sort_keys=True) for s in shards}
    return {"shards": shards, "cases": len(latest), **counts, "failed_cases": failed,
            "unfinished_reports": unfinished, "one_model": len(models) <= 1}
