"""Figures (matplotlib, no GUI: figures are drawn on Agg/SVG canvases and written as PNG and SVG).

The figures a report draws (`iter_figures`) and writes (`write_figures`):

- Robust accuracy vs ε, per data set and norm: the models without defense in
  one panel, each attacked pipeline (denoise, noise, sgld, smooth) in a panel
  of its own with the same axes; a line per system is the lowest robust
  accuracy over every attack run on it at each ε, with its 95% interval as a
  light band and a ring where sanity flags fired.
- Certified accuracy vs L2 radius, per data set: a panel per σ (Cohen et al.'s
  figure), and one panel with each model's envelope over σ; direct and
  denoised certification differ by line style, and the largest radius a run
  can certify (σ·Φ⁻¹(α^(1/n)), where all n votes for one class land) is marked.
- PSNR vs σ for the models measured by a `denoise` run, with the noisy input
  as reference.
- Per model: its attack runs (every attack and defense) and its certified
  curves with their envelope.

Every model keeps one identity (colour and marker, `robusteval.reports.styles`)
in every figure; legends sit outside the plotting area, on the right, and list
each model once. Every line carries an SVG id (`curve-…`, `band-…`, `flag-…`,
`envelope-…`, `reference-…`, `cap-…`) so tests and readers can find it in the file.

The figures are drawn in `robust_figures`, `certified_figures` and `denoising_figures`, on the layout
and house style of `figure_layout`; their public names stay importable from here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from robusteval.core.vocabulary import NORM_SYMBOL, NORMS
from robusteval.reports.certified_figures import (
    certified_curve,
    certified_envelope_figure,
    certified_figure,
    largest_certifiable_radius,
    model_certified_figure,
)
from robusteval.reports.denoising_figures import psnr_figure
from robusteval.reports.figure_layout import (
    BAND_LABEL,
    FLAG_EDGE,
    FLAG_LABEL,
    REFERENCE_GREY,
    SIGMA_LINESTYLES,
    save_figure,
)
from robusteval.reports.loading import Run
from robusteval.reports.paths import slug
from robusteval.reports.robust_figures import (
    REFERENCE_LABEL,
    RobustPoint,
    band_alpha,
    best_known_curve,
    model_robustness_figure,
    robustness_figure,
)
from robusteval.reports.styles import Identity, model_identities, write_identities

__all__ = [
    "BAND_LABEL", "FLAG_EDGE", "FLAG_LABEL", "IDENTITIES_FILE", "REFERENCE_GREY", "REFERENCE_LABEL",
    "SIGMA_LINESTYLES", "DrawnFigure", "FigureFile", "FigureSet", "RobustPoint", "band_alpha",
    "best_known_curve", "certified_curve", "certified_envelope_figure", "certified_figure", "iter_figures",
    "largest_certifiable_radius", "model_certified_figure", "model_robustness_figure", "psnr_figure",
    "robustness_figure", "save_figure", "write_figures",
]

IDENTITIES_FILE = "identities.json"


@dataclass(frozen=True)
class FigureFile:
    """One written figure: what it shows and where its PNG and SVG are."""

    name: str
    title: str
    svg: Path
    png: Path
    dataset: str
    model: str | None = None


@dataclass
class FigureSet:
    """The figures of one report: overall ones, per model, and the model identities they use."""

    overall: list[FigureFile] = field(default_factory=list)
    per_model: dict[str, list[FigureFile]] = field(default_factory=dict)
    identities: Path | None = None

    def all(self) -> list[FigureFile]:
        return [*self.overall, *(f for files in self.per_model.values() for f in files)]


# --- all figures of a report -----------------------------------------------------------------
@dataclass(frozen=True)
class DrawnFigure:
    """A figure before it is written: its file stem, caption, data set and (for per-model figures) model."""

    figure: Figure
    name: str
    title: str
    dataset: str
    model: str | None = None


_CAP_NOTE = "; dotted: the largest radius the runs' n can certify, σ·Φ⁻¹(α^(1/n))"


def iter_figures(runs: Sequence[Run], identities: dict[str, Identity]) -> Iterator[DrawnFigure]:
    """Every figure the runs support, one at a time (a report writes each and lets it go)."""
    for dataset in sorted({r.dataset for r in runs}):
        attack_runs = [r for r in runs if r.kind == "attack" and r.dataset == dataset]
        norms = [n for n in NORMS if any(r.summary["norm"] == n for r in attack_runs)]
        for norm in norms:
            yield DrawnFigure(robustness_figure(runs, dataset, norm, identities), f"robust_{slug(dataset)}_{norm}",
                              f"Robust accuracy vs ε ({dataset}, {NORM_SYMBOL[norm]})", dataset)
        if any(r.kind == "certify" and r.dataset == dataset for r in runs):
            yield DrawnFigure(certified_figure(runs, dataset, identities), f"certified_{slug(dataset)}",
                              f"Certified accuracy vs radius, per σ ({dataset}){_CAP_NOTE}", dataset)
            yield DrawnFigure(certified_envelope_figure(runs, dataset, identities),
                              f"certified_envelope_{slug(dataset)}",
                              f"Certified accuracy vs radius, envelope over σ ({dataset}){_CAP_NOTE}", dataset)
        if any(r.kind == "denoise" and r.dataset == dataset for r in runs):
            yield DrawnFigure(psnr_figure(runs, dataset, identities), f"psnr_{slug(dataset)}",
                              f"Denoising PSNR vs σ ({dataset})", dataset)
        for model in sorted({r.model for r in runs if r.dataset == dataset}):
            mine = [r for r in runs if r.model == model and r.dataset == dataset]
            for norm in NORMS:
                if any(r.kind == "attack" and r.summary["norm"] == norm for r in mine):
                    yield DrawnFigure(model_robustness_figure(runs, model, dataset, norm, identities[model]),
                                      f"model_{slug(model)}_robust_{slug(dataset)}_{norm}",
                                      f"{model}: robust accuracy vs ε ({dataset}, {NORM_SYMBOL[norm]})", dataset,
                                      model)
            if any(r.kind == "certify" for r in mine):
                yield DrawnFigure(model_certified_figure(runs, model, dataset, identities[model]),
                                  f"model_{slug(model)}_certified_{slug(dataset)}",
                                  f"{model}: certified accuracy vs radius ({dataset}){_CAP_NOTE}", dataset, model)


def write_figures(runs: Sequence[Run], out_dir: str | Path,
                  identities: dict[str, Identity] | None = None) -> FigureSet:
    """Draw and write every figure the runs support, and the model identities they use; returns what was written."""
    out_dir = Path(out_dir)
    identities = identities or model_identities(r.model for r in runs)
    result = FigureSet(identities=write_identities(identities, out_dir / IDENTITIES_FILE))
    for drawn in iter_figures(runs, identities):
        svg, png = save_figure(drawn.figure, out_dir / drawn.name)
        entry = FigureFile(drawn.name, drawn.title, svg, png, drawn.dataset, drawn.model)
        if drawn.model is None:
            result.overall.append(entry)
        else:
            result.per_model.setdefault(drawn.model, []).append(entry)
    return result
