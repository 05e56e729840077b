"""`robusteval report`: every figure and table of a set of runs, plus the main output in one format.

Layout, for `--out reports/leaderboard.html`::

    reports/leaderboard.html      the main output (here: the HTML leaderboard)
    reports/figures/*.png|svg     every figure
    reports/tables/*.md|csv|tex   every table

Formats of the main output: `html` (the self-contained leaderboard), `md` (a
Markdown report: tables and figure links), `csv` (the leaderboard's numbers),
`latex` (every table), `robustbench` (`--out` is a folder that receives
`model_info/<dataset>/<Linf|L2>/<Name>.json`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from robusteval.core.atomic_files import atomic_write_bytes
from robusteval.core.errors import UsageError
from robusteval.core.preflight import (
    check_writable_directory,
    check_writable_file,
    make_directory,
)
from robusteval.core.vocabulary import REPORT_FORMATS
from robusteval.reports.figures import FigureSet, write_figures
from robusteval.reports.html import render_html, write_html
from robusteval.reports.loading import Run
from robusteval.reports.robustbench import write_robustbench
from robusteval.reports.tables import TableSet, write_tables


@dataclass
class Report:
    """What a report wrote."""

    main: Path
    figures: FigureSet
    tables: TableSet
    extra: list[Path] = field(default_factory=list)


def _markdown_report(runs: Sequence[Run], tables: TableSet, figures: FigureSet, out_dir: Path,
                     command: str | None, notes: Sequence[str] = ()) -> str:
    parts = ["# robusteval report", ""]
    if command:
        parts += [f"Regenerate with `{command}`.", ""]
    for note in notes:
        parts += [note, ""]
    parts += ["## Leaderboard", "", tables.files["leaderboard.md"].read_text(), ""]
    for figure in figures.overall:
        parts += [f"![{figure.title}]({Path(os.path.relpath(figure.png, out_dir)).as_posix()})", ""]
    if figures.identities is not None:
        href = Path(os.path.relpath(figures.identities, out_dir)).as_posix()
        parts += [f"Each model keeps one colour and marker in every figure ([{href}]({href})).", ""]
    for name, heading in (("certified.md", "## Certified radii"), ("adversarial.md", "## Adversarial robustness")):
        if name in tables.files:
            parts += [heading, "", tables.files[name].read_text(), ""]
    return "\n".join(parts)


def write_report(runs: Sequence[Run], out: str | Path, fmt: str = "html",
                 eps_overrides: dict[str, float] | None = None, radii: Sequence[float] | None = None,
                 command: str | None = None, title: str = "robusteval leaderboard",
                 notes: Sequence[str] = ()) -> Report:
    """Write figures and tables beside `out`, then the main output in format `fmt`.

    notes: paragraphs for the HTML and Markdown reports (e.g. the sizes of the grid behind them).
    """
    if fmt not in REPORT_FORMATS:
        raise UsageError(f"unknown report format {fmt!r}; expected one of {', '.join(REPORT_FORMATS)}")
    if not runs:
        raise UsageError("no runs to report on")
    out = Path(out)
    if fmt == "robustbench":
        if out.exists() and not out.is_dir():
            raise UsageError(f"--format robustbench writes a folder; {out} is a file")
        out_dir = out
    else:
        if out.is_dir():
            raise UsageError(f"--out {out} is a folder; give a file name, e.g. {out / 'leaderboard.html'}")
        out_dir = out.parent
    # Before any figure is drawn: an output that cannot be written is one line, not a traceback half-way.
    if fmt == "robustbench":
        check_writable_directory(out, "report folder")
    else:
        check_writable_file(out, "report file")
    make_directory(out_dir, "report folder")
    figures = write_figures(runs, out_dir / "figures")
    tables = write_tables(runs, out_dir / "tables", eps_overrides, radii)
    report = Report(main=out, figures=figures, tables=tables)
    if fmt == "html":
        write_html(out, render_html(runs, tables, figures, out_dir, title=title, command=command,
                                            notes=notes))
    elif fmt == "md":
        atomic_write_bytes(out, _markdown_report(runs, tables, figures, out_dir, command, notes).encode())
    elif fmt == "csv":
        atomic_write_bytes(out, tables.files["leaderboard.csv"].read_bytes())
    elif fmt == "latex":
        text = "\n".join(tables.files[name].read_text() for name in ("leaderboard.tex", "certified.tex",
                                                                   "adversarial.tex") if name in tables.files)
        atomic_write_bytes(out, text.encode())
    else:
        report.extra = write_robustbench(runs, out, eps_overrides)
    return report
