"""The cohort QC report: one self-contained HTML page over the case records of output folders.

``uniseg report OUTDIR... -o report.html`` reads every case record (``uniseg_cli.outputs.record``)
under the folders (shards writing into one folder, or several folders), and writes a page that opens
offline in any browser (no external script, font or image): one row per case, flagged cases first,
with each structure's volume, volume range and mean probability, the case's quality flags with their
reasons, a three-plane preview inline (the one ``predict --preview`` wrote, else drawn from the label
map and the scan when they can be read), and links to the files. The table sorts by any column and
filters by text or to flagged cases only, with a few lines of inline JavaScript.
"""

from __future__ import annotations

import base64
import html
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniseg_cli.errors import UsageError
from uniseg_cli.outputs.record import read_record
from uniseg_cli.outputs.run_report import is_run_report, merge_run_reports, read_run_report

log = logging.getLogger(__name__)


@dataclass
class CaseEntry:
    """One case record and where it lies."""

    path: Path
    record: dict[str, Any]
    preview: str | None = None          # a data: URI
    preview_note: str = ""
    structures: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def result(self) -> dict[str, Any]:
        return self.record.get("result") or {}

    @property
    def flags(self) -> list[dict[str, Any]]:
        return [f for f in self.result.get("flags") or [] if isinstance(f, dict)]


@dataclass
class Cohort:
    """What the folders hold: the case records and the merged run reports of every shard."""

    entries: list[CaseEntry]
    summary: dict[str, Any]


def find_cohort(folders: Sequence[Path]) -> Cohort:
    """Every case record and run report under ``folders`` (recursively), each once."""
    entries: dict[Path, CaseEntry] = {}
    reports: dict[Path, tuple[Path, dict[str, Any]]] = {}
    for folder in folders:
        if not folder.is_dir():
            raise UsageError(f"{folder}: not a folder of uniseg outputs")
        for path in sorted(folder.rglob("*.json")):
            if path.name.startswith(".") or path.resolve() in entries or path.resolve() in reports:
                continue
            if is_run_report(path):
                data = read_run_report(path)
                if data is not None:
                    reports[path.resolve()] = (path, data)
                continue
            record = read_record(path)
            if record is not None and "result" in record:
                entries[path.resolve()] = CaseEntry(path, record)
    found = sorted(entries.values(), key=lambda e: (str(e.record.get("case")), str(e.path)))
    if not found and not reports:
        raise UsageError(f"no case records or run reports of uniseg predict under {', '.join(map(str, folders))}")
    summary = merge_run_reports(list(reports.values()))
    summary["records"] = len(found)
    summary["flagged"] = sum(1 for e in found if e.flags)
    return Cohort(found, summary)


def write_report(cohort: Cohort, folders: Sequence[Path], output: Path, *, previews: bool = True) -> None:
    """Write the page to ``output`` (atomically)."""
    from uniseg_cli.io.atomic import write_text

    for entry in cohort.entries:
        entry.structures = {s["name"]: s for s in (entry.result.get("labels") or []) + (entry.result.get("regions") or [])
                            if isinstance(s, dict) and "name" in s}
        if previews:
            entry.preview, entry.preview_note = _preview(entry)
    write_text(output, render(cohort, output, folders))


def failed_cases_text(cohort: Cohort) -> str:
    """The failed cases, one per line as ``predict -`` reads them (channels comma-separated)."""
    return "".join(",".join(case["inputs"]) + "\n" for case in cohort.summary["failed_cases"] if case["inputs"])


# ------------------------------------------------------------------------------------------ previews
def _preview(entry: CaseEntry) -> tuple[str | None, str]:
    folder = entry.path.parent
    for name, info in (entry.record.get("files") or {}).items():
        if isinstance(info, dict) and info.get("role") == "preview" and (folder / name).is_file():
            return _data_uri((folder / name).read_bytes()), ""
    try:
        return _drawn(entry), ""
    except Exception as exc:  # noqa: BLE001 - a case without a preview is reported, not fatal
        from uniseg_cli.errors import first_line

        log.debug("%s: no preview", entry.path, exc_info=True)
        return None, f"no preview: {first_line(exc)}"


def _drawn(entry: CaseEntry) -> str:
    """A preview drawn from the label map and the scan (channel 0), as ``predict --preview`` draws it."""
    from uniseg_cli.inference.phases import Label
    from uniseg_cli.io.images import read_channels, read_image
    from uniseg_cli.outputs.preview import write_preview

    folder = entry.path.parent
    inputs = [Path(p) for p in entry.record.get("inputs") or []]
    if not inputs:
        raise UsageError("the record names no inputs")
    located = [p if p.exists() else folder / p for p in inputs]
    missing = [str(p) for p in located if not p.exists()]
    if missing:
        raise UsageError(f"the scan {missing[0]} is not there")
    labels, _ = read_image(folder / str(entry.record.get("label_map")))
    intensity, geometry = read_channels(located[:1])
    legend = [Label(int(row["value"]), str(row["name"]), str(row.get("task", ""))) for row in entry.record["labels"]]
    is_ct = float(intensity.min()) < -500   # the CT window for CT scans, as predict draws them
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "preview.png"
        write_preview(png, intensity[0], labels[0].astype("uint8"), legend, geometry,
                      title=f"{entry.record.get('case')}: {entry.record.get('task')}", is_ct=is_ct)
        return _data_uri(png.read_bytes())


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ------------------------------------------------------------------------------------------ the page
def render(cohort: Cohort, output: Path, folders: Sequence[Path]) -> str:
    """The HTML text of the page."""
    entries = cohort.entries
    names = list(dict.fromkeys(name for e in entries for name in e.structures))
    ordered = sorted(entries, key=lambda e: (-len(e.flags), str(e.record.get("case"))))
    flagged = sum(1 for e in entries if e.flags)
    codes: dict[str, int] = {}
    for entry in entries:
        for code in dict.fromkeys(f["code"] for f in entry.flags):
            codes[code] = codes.get(code, 0) + 1
    head = "".join(f'<th data-type="{kind}">{html.escape(title)}</th>' for title, kind in
                   [("preview", "text"), ("case", "text"), ("task", "text"), ("flags", "number")]
                   + [(f"{n} (mL)", "number") for n in names] + [("files", "text")])
    rows = "\n".join(_row(e, names, output) for e in ordered)
    summary = ", ".join(f"{html.escape(c)} {n}" for c, n in sorted(codes.items())) or "none"
    sources = ", ".join(html.escape(str(f)) for f in folders)
    return _PAGE.format(count=len(entries), flagged=flagged, summary=summary, sources=sources, head=head, rows=rows,
                        style=_STYLE, script=_SCRIPT, runs=_runs(cohort.summary))


def _runs(summary: dict[str, Any]) -> str:
    """The shards' runs and the failed cases, from the run reports."""
    if not summary["shards"]:
        return ""
    parts = [f"<p>{len(summary['shards'])} run report(s): {summary['written']} case(s) written, {summary['skipped']} "
             f"skipped, <strong>{summary['failed']} failed</strong>"
             + (f"; not finished (killed?): {html.escape(', '.join(summary['unfinished_reports']))}"
                if summary["unfinished_reports"] else "") + ".</p>"]
    if summary["failed_cases"]:
        items = "".join(f"<tr><td>{html.escape(c['case'])}</td><td>{html.escape(str(c['error']))}</td>"
                        f"<td>{html.escape(c['report'])}</td></tr>" for c in summary["failed_cases"])
        parts.append(f'<table id="failed"><thead><tr><th>failed case</th><th>error</th><th>run report</th></tr>'
                     f"</thead><tbody>{items}</tbody></table>")
    return "\n".join(parts)


def _row(entry: CaseEntry, names: Sequence[str], output: Path) -> str:
    result = entry.result
    flags = entry.flags
    by_label: dict[str, list[dict[str, Any]]] = {}
    for f in flags:
        by_label.setdefault(str(f.get("label")), []).append(f)
    preview = (f'<img class="preview" alt="preview of {html.escape(str(entry.record.get("case")))}" '
               f'src="{entry.preview}">' if entry.preview else f'<span class="note">{html.escape(entry.preview_note)}</span>')
    badges = "".join(f'<span class="flag">{html.escape(code)}</span>' for code in dict.fromkeys(f["code"] for f in flags))
    reasons = "".join(f"<li>{html.escape(f['reason'])}</li>" for f in flags)
    cells = [f"<td>{preview}</td>",
             f'<td data-sort="{html.escape(str(entry.record.get("case")))}">{html.escape(str(entry.record.get("case")))}</td>',
             f"<td>{html.escape(str(result.get('task', entry.record.get('task', ''))))}</td>",
             f'<td data-sort="{len(flags)}">{badges}<ul>{reasons}</ul></td>']
    for name in names:
        structure = entry.structures.get(name)
        if structure is None:
            cells.append('<td data-sort="" class="absent">–</td>')
            continue
        volume = structure.get("volume_ml")
        detail = []
        confidence = structure.get("confidence") or {}
        if confidence.get("volume_ml_range"):
            low, high = confidence["volume_ml_range"]
            detail.append(f"{low:g}–{high:g}")
        if confidence.get("mean_probability") is not None:
            detail.append(f"p̄ {confidence['mean_probability']:.2f}")
        own = by_label.get(name, [])
        title = "; ".join(f["reason"] for f in own)
        css = ' class="flagged"' if own else ""
        cells.append(f'<td data-sort="{volume}"{css} title="{html.escape(title)}">{volume:g}'
                     f'<div class="detail">{html.escape(" · ".join(detail))}</div></td>')
    links = []
    for name, info in (entry.record.get("files") or {}).items():
        target = entry.path.parent / name
        href = Path(os.path.relpath(target, output.parent)).as_posix()
        role = info.get("role", "file") if isinstance(info, dict) else "file"
        links.append(f'<a href="{html.escape(href)}">{html.escape(role)}</a>')
    record_href = Path(os.path.relpath(entry.path, output.parent)).as_posix()
    links.append(f'<a href="{html.escape(record_href)}">record</a>')
    cells.append(f"<td>{' '.join(links)}</td>")
    return f'<tr data-flags="{len(flags)}">{"".join(cells)}</tr>'


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .3em}
.controls{margin:1em 0}
.controls input[type=search]{width:22em;padding:.3em}
.controls label,#shown{margin-left:1em}
table{border-collapse:collapse;font-size:.9em}
th,td{border:1px solid #ccc;padding:.35em .5em;vertical-align:top}
th{background:#f1f1f1;cursor:pointer;position:sticky;top:0;user-select:none}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
td.flagged{background:#fde2e2}
td.absent{color:#aaa}
.flag{display:inline-block;background:#c0392b;color:#fff;border-radius:3px;padding:0 .35em;margin:0 .2em .2em 0}
td ul{margin:.2em 0 0 1.1em;padding:0;font-size:.85em;color:#555;max-width:28em}
.detail{font-size:.8em;color:#666}
img.preview{max-width:360px;display:block}
.note{color:#888;font-size:.85em}
"""

_SCRIPT = """
(function(){
  var table=document.getElementById('cases'), body=table.tBodies[0];
  var search=document.getElementById('filter'), only=document.getElementById('flagged-only');
  var shown=document.getElementById('shown');
  function update(){
    var q=search.value.toLowerCase(), n=0;
    Array.prototype.forEach.call(body.rows,function(r){
      var ok=(!q||r.textContent.toLowerCase().indexOf(q)>=0)&&(!only.checked||r.getAttribute('data-flags')!=='0');
      r.style.display=ok?'':'none'; if(ok){n++;}
    });
    shown.textContent=n+' of '+body.rows.length+' cases shown';
  }
  function key(row,i,numeric){
    var c=row.cells[i], v=c.hasAttribute('data-sort')?c.getAttribute('data-sort'):c.textContent;
    if(!numeric){return v.toLowerCase();}
    var x=parseFloat(v); return isNaN(x)?-Infinity:x;
  }
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,i){
    th.addEventListener('click',function(){
      var numeric=th.getAttribute('data-type')==='number', asc=!th.classList.contains('asc');
      Array.prototype.forEach.call(table.tHead.rows[0].cells,function(o){o.classList.remove('asc','desc');});
      th.classList.add(asc?'asc':'desc');
      var rows=Array.prototype.slice.call(body.rows);
      rows.sort(function(a,b){var x=key(a,i,numeric),y=key(b,i,numeric);return (x<y?-1:x>y?1:0)*(asc?1:-1);});
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
  search.addEventListener('input',update); only.addEventListener('change',update); update();
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>uniseg QC report: {count} cases</title>
<style>{style}</style></head>
<body>
<h1>uniseg QC report</h1>
<p>{count} cases from {sources}; <strong>{flagged} flagged</strong> (cases per flag: {summary}). Flagged cases
come first; click a column to sort, hover a flagged cell for its reason. Flags and volume ranges are defined in
the uniseg documentation (docs/quality.md).</p>
{runs}
<div class="controls"><input type="search" id="filter" placeholder="filter: case, task, flag…">
<label><input type="checkbox" id="flagged-only"> flagged only</label> <span id="shown"></span></div>
<table id="cases"><thead><tr>{head}</tr></thead>
<tbody>
{rows}
</tbody></table>
<script>{script}</script>
</body></html>
"""

