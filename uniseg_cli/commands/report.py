"""``uniseg report``: the cohort QC page over one or more output folders."""

from __future__ import annotations

from pathlib import Path

import typer


def report(
    folders: list[Path] = typer.Argument(..., metavar="OUTDIR...", help="Output folders of uniseg predict (several shards' folders too); their case records (<case>.json) are read, subfolders included."),
    output: Path = typer.Option(..., "--output", "-o", help="The HTML page to write (self-contained: opens offline in any browser)."),
    previews: bool = typer.Option(True, "--previews/--no-previews", help="Embed each case's three-plane preview: the PNG predict --preview wrote, else drawn from the label map and the scan (about a second per case)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing page."),
) -> None:
    """Write a QC page of a cohort: one row per case (flagged cases first) with each structure's volume,
    volume range and confidence, the quality flags and their reasons, previews and links to the files.

    \b
    Example:
      uniseg predict scans/ -t liver,spleen -o out/ --uncertainty --preview
      uniseg report out/ -o report.html
    """
    import logging

    from uniseg_cli.errors import UsageError
    from uniseg_cli.outputs.report import write_report

    if not output.name.lower().endswith((".html", ".htm")):
        raise UsageError(f"{output}: the report is an HTML page; give a name ending in .html")
    if output.exists() and not force:
        raise UsageError(f"{output}: exists; --force replaces it")
    if output.is_dir():
        raise UsageError(f"{output}: is a folder")
    entries = write_report(folders, output, previews=previews)
    flagged = sum(1 for e in entries if e.flags)
    logging.getLogger("uniseg_cli").info("%s: %d case(s), %d flagged", output, len(entries), flagged)
    print(output)
