"""The HTML leaderboard: one self-contained file.

Inline CSS, figures embedded as inline SVG, a small inline script for the
sortable table, and a Content-Security-Policy that forbids loading anything:
the page makes no network request. Jinja2 renders it with autoescaping on, so
every string that comes from a run or a model card is HTML-escaped; the only
markup inserted unescaped is the SVG matplotlib wrote, which is checked first
(no scripts, no event handlers, no external references).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from robusteval.core.atomic_files import atomic_write_bytes
from robusteval.core.names import UnknownNameError
from robusteval.core.vocabulary import NORM_SYMBOL, norm_order
from robusteval.model_zoo.factory import model_card
from robusteval.reports.figures import FigureFile, FigureSet
from robusteval.reports.loading import Run
from robusteval.reports.paths import slug
from robusteval.reports.tables import (
    TableSet,
    adversarial_display,
    certified_display,
    format_number,
)

_TEMPLATES = Path(__file__).parent / "templates"
_PROLOG = re.compile(r"<\?xml.*?\?>|<!DOCTYPE.*?>|<!--.*?-->|<metadata>.*?</metadata>", re.S)
_ID = re.compile(r'\bid="([^"]+)"')
# Inside tags only: text content is escaped by matplotlib's SVG writer, so "<" cannot start a tag there.
_UNSAFE_SVG = re.compile(r"<\s*(script|foreignObject|iframe|image)\b|<[^>]*\son[a-z]+\s*=|<[^>]*javascript:|"
                         r"<[^>]*\b(?:xlink:)?href=\"(?!#)", re.I)


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_TEMPLATES)),
        autoescape=True,  # every {{ value }} is escaped unless it is Markup
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def inline_svg(path: Path, prefix: str) -> Markup:
    """An SVG file as markup to inline: prolog and metadata dropped, ids prefixed so figures do not clash.

    Raises ValueError when the SVG holds anything active (scripts, event handlers, external links).
    """
    text = _PROLOG.sub("", path.read_text(encoding="utf-8")).strip()
    if not text.startswith("<svg"):
        raise ValueError(f"{path} is not an SVG document")
    if _UNSAFE_SVG.search(text):
        raise ValueError(f"{path} holds active content or external references; refusing to inline it")
    ids = set(_ID.findall(text))

    def rename(match: re.Match) -> str:
        return f'id="{prefix}-{match.group(1)}"'

    text = _ID.sub(rename, text)
    for old in sorted(ids, key=len, reverse=True):
        text = text.replace(f"#{old})", f"#{prefix}-{old})").replace(f'href="#{old}"', f'href="#{prefix}-{old}"')
    # Accessible name for the figure.
    text = text.replace("<svg ", '<svg role="img" ', 1)
    return Markup(text)


def _figure_context(figure: FigureFile, out_dir: Path, index: int, section: str = "") -> dict[str, Any]:
    return {
        "title": figure.title,
        "anchor": f"{section}figure-{slug(figure.name)}",
        "svg": inline_svg(figure.svg, f"f{index}"),
        "png_href": Path(os.path.relpath(figure.png, out_dir)).as_posix(),
        "svg_href": Path(os.path.relpath(figure.svg, out_dir)).as_posix(),
    }


def _card(model: str, dataset_names: Sequence[str]) -> tuple[list[tuple[str, str]] | None, str]:
    """The model card as (field, text) pairs, or None and a note for a model that is not registered."""
    if model.startswith("robustbench:"):
        return None, "A RobustBench model-zoo architecture (weights from a local model directory); no robusteval card."
    try:
        card = model_card(model)
    except UnknownNameError:
        return None, ("Not a registered robusteval model (for example a user's model evaluated through "
                      "robusteval.wrap): no model card.")
    fields = [("system", card.system), ("family", card.family), ("paper", card.paper),
              ("capabilities", ", ".join(sorted(card.capabilities)))]
    if card.description:
        fields.append(("description", card.description))
    fields.append(("randomness", card.randomness))
    if card.recipe:
        fields.append(("recipe", ", ".join(f"{k} = {v}" for k, v in sorted(card.recipe.items()))))
    checkpoints = card.checkpoints()
    for dataset in dataset_names:
        record = checkpoints.get(dataset)
        if record:
            metrics = ", ".join(f"{k} {v}" for k, v in (record.get("metrics") or {}).items())
            fields.append((f"weights ({dataset})",
                           f"{record.get('file')} (sha256 {str(record.get('sha256', ''))[:16]}…), trained by "
                           f"`{record.get('command', '')}`" + (f"; {metrics}" if metrics else "")))
    return fields, ""


def _what(run: Run) -> str:
    summary = run.summary
    if run.kind == "attack":
        return (f"attack: {run.attack_label}, {NORM_SYMBOL[summary['norm']]}, defense {run.defense}, "
                f"n = {summary['n']}")
    if run.kind == "certify":
        draws = (f"n = {summary['n']}" if summary.get("method") != "sequential" else
                 f"sequential on r = {', '.join(format_number(float(r)) for r in summary['radii'])}, "
                 f"n ≤ {summary['n_max']} (mean {summary['draws_per_image']['mean']:.0f})")
        return (f"certify: {summary['mode']}, σ = {format_number(float(summary['sigma']))}, n0 = {summary['n0']}, "
                f"{draws}, α = {summary['alpha']}, {summary['n_images']} images")
    sigmas = ", ".join(format_number(float(p["sigma"])) for p in summary["psnr"])
    return f"denoise: σ = {sigmas}, {summary['n_images']} images"


def _provenance(run: Run) -> dict[str, Any]:
    prov = run.provenance
    versions = prov.get("versions") or {}
    shown = ", ".join(f"{k} {v}" for k, v in versions.items()) if isinstance(versions, dict) else str(versions)
    seconds = run.summary.get("seconds")
    return {
        "name": run.path.name,
        "what": _what(run),
        "seed": "–" if run.seed is None else run.seed,
        "commit": prov.get("git_commit") or "unknown",
        "command": prov.get("command") or "unknown",
        "created": prov.get("created") or "unknown",
        "seconds": f"{float(seconds):.1f}" if isinstance(seconds, (int, float)) else "–",
        "versions": shown or "unknown",
    }


def _number_cell(value: float) -> dict[str, str]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return {"sort": "", "text": "–"}
    return {"sort": repr(float(value)), "text": f"{100 * float(value):.1f}"}


def render_html(runs: Sequence[Run], tables: TableSet, figures: FigureSet, out_dir: str | Path,
                title: str = "robusteval leaderboard", command: str | None = None,
                notes: Sequence[str] = ()) -> str:
    """The leaderboard page as a string (links to PNG/SVG files are relative to `out_dir`).

    notes: paragraphs shown under the title (e.g. the grid's sizes), escaped like every other string.
    """
    out_dir = Path(out_dir)
    index = iter(range(10**6))
    anchors = {model: f"model-{slug(model)}" for model in {r.model for r in runs}}
    certified_headers, certified_rows = [], []
    if not tables.certified.values.empty:
        shown = certified_display(tables.certified)
        certified_headers = list(shown.columns)
        certified_rows = shown.astype(str).values.tolist()
    overall = [_figure_context(f, out_dir, next(index)) for f in figures.overall]
    models = [_model_context(model, runs, figures, out_dir, anchors[model], index)
              for model in sorted({r.model for r in runs})]
    kinds = {}
    for run in runs:
        kinds[run.kind] = kinds.get(run.kind, 0) + 1
    try:
        version = metadata.version("robusteval")
    except metadata.PackageNotFoundError:
        version = "unknown"
    template = _environment().get_template("leaderboard.html.j2")
    return template.render(
        title=title, version=version, command=command, notes=list(notes),
        created=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        runs_count=len(runs), kinds=", ".join(f"{v} {k}" for k, v in sorted(kinds.items())),
        datasets=sorted({r.dataset for r in runs}), leaderboards=_leaderboards(tables, anchors),
        overall_figures=overall,
        identities_href=(Path(os.path.relpath(figures.identities, out_dir)).as_posix() if figures.identities else ""),
        certified_headers=certified_headers, certified_rows=certified_rows,
        adversarial_tables=_adversarial_tables(tables), models=models,
    )


def _leaderboards(tables: TableSet, anchors: dict[str, str]) -> list[dict[str, Any]]:
    """One sortable leaderboard per data set, with the columns it has values for."""
    leaderboards = []
    board = tables.leaderboard
    for dataset in sorted(board["dataset"].unique()) if not board.empty else []:
        part = board[board["dataset"] == dataset]
        keys = [c for c in tables.leaderboard_columns if part[c.key].notna().any()]
        leaderboards.append({
            "dataset": dataset,
            "table_id": f"leaderboard-{slug(dataset)}",
            "columns": keys,
            "sorted_by": next((c.key for c in keys if c.key.startswith("best_")), "clean"),
            "rows": [{
                "system": row["system"], "anchor": anchors[row["model"]], "unreliable": bool(row["unreliable"]),
                "flags": row["flags"] or "", "cells": [_number_cell(row[c.key]) for c in keys],
            } for _, row in part.iterrows()],
        })
    return leaderboards


def _adversarial_tables(tables: TableSet) -> list[dict[str, Any]]:
    """Robust accuracy per ε and attack, one table per (data set, norm)."""
    if tables.adversarial.empty:
        return []
    result = []
    pairs = tables.adversarial[["dataset", "norm"]].drop_duplicates().itertuples(index=False)
    for dataset, norm in sorted(pairs, key=lambda p: (p[0], norm_order(p[1]))):
        shown = adversarial_display(tables.adversarial, dataset, norm)
        result.append({"title": f"{dataset}, {NORM_SYMBOL[norm]}", "headers": list(shown.columns),
                       "rows": shown.astype(str).values.tolist()})
    return result


def _model_context(model: str, runs: Sequence[Run], figures: FigureSet, out_dir: Path, anchor: str,
                   index: Iterator[int]) -> dict[str, Any]:
    """A model's section: its card, figures and the provenance of its runs."""
    mine = [r for r in runs if r.model == model]
    card, note = _card(model, sorted({r.dataset for r in mine}))
    model_figures = [_figure_context(f, out_dir, next(index)) for f in figures.per_model.get(model, [])]
    # A model measured only for denoising shows the PSNR figure it appears in.
    if not model_figures:
        model_figures = [_figure_context(f, out_dir, next(index), f"{anchor}-") for f in figures.overall
                         if f.name.startswith("psnr_") and any(r.kind == "denoise" and r.dataset == f.dataset
                                                               for r in mine)]
    return {"name": model, "anchor": anchor, "card": card, "card_note": note, "figures": model_figures,
            "runs": [_provenance(r) for r in sorted(mine, key=lambda r: (r.kind, r.path.name))]}


def write_html(path: str | Path, page: str) -> Path:
    """Write the page atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, page.encode("utf-8"))
    return path

