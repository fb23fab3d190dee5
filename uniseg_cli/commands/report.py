"""``uniseg report``: the cohort QC page over one or more output folders."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def report(
    folders: list[Path] = typer.Argument(..., metavar="OUTDIR...", help="Output folders of uniseg predict (several shards' folders too): their case records (<case>.json) and run reports (uniseg-run*.json) are read, subfolders included."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="The HTML QC page to write (self-contained: opens offline in any browser)."),
    summary: Optional[Path] = typer.Option(None, "--summary", metavar="FILE.json", help="Write the shards' run reports merged: every shard, per case its latest outcome, the failed cases with their errors."),
    failed: Optional[Path] = typer.Option(None, "--failed", metavar="FILE", help="Write the failed cases, one per line, for `uniseg predict - ... < FILE` to redo only them."),
    previews: bool = typer.Option(True, "--previews/--no-previews", help="Embed each case's three-plane preview: the PNG predict --preview wrote, else drawn from the label map and the scan (about a second per case)."),
    force: bool = typer.Option(False, "--force", help="Replace existing files."),
) -> None:
    """Review a cohort: the QC page (one row per case, flagged cases first, each structure's volume, range
    and confidence, the quality flags and their reasons, previews, links to the files), the shards' run
    reports merged, and the failed cases as a list to redo.

    \b
    Examples:
      uniseg predict scans/ -t liver,spleen -o out/ --uncertainty --preview
      uniseg report out/ -o report.html
      uniseg report out/ --summary summary.json --failed failed.txt && uniseg predict - -t liver,spleen -o out/ < failed.txt
    """
    import json
    import logging

    from uniseg_cli.errors import UsageError
    from uniseg_cli.io.atomic import write_text
    from uniseg_cli.outputs.report import failed_cases_text, find_cohort, write_report

    if output is None and summary is None and failed is None:
        raise UsageError("give -o report.html, --summary FILE.json or --failed FILE")
    if output is not None and not output.name.lower().endswith((".html", ".htm")):
        raise UsageError(f"{output}: the report is an HTML page; give a name ending in .html")
    targets = [p for p in (output, summary, failed) if p is not None]
    if len({p.resolve() for p in targets}) < len(targets):
        raise UsageError("-o, --summary and --failed must name different files")
    for path in targets:
        if path.is_dir():
            raise UsageError(f"{path}: is a folder")
        if path.exists() and not force:
            raise UsageError(f"{path}: exists; --force replaces it")
    cohort = find_cohort(folders)
    if summary is not None:
        write_text(summary, json.dumps(cohort.summary, indent=2) + "\n")
    if failed is not None:
        write_text(failed, failed_cases_text(cohort))
    if output is not None:
        write_report(cohort, folders, output, previews=previews)
    s = cohort.summary
    logging.getLogger("uniseg_cli").info("%d case record(s), %d flagged; %d run report(s): %d written, %d skipped, "
                                         "%d failed", s["records"], s["flagged"], len(s["shards"]), s["written"],
                                         s["skipped"], s["failed"])
    for path in targets:
        print(path)
