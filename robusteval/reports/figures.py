"""Figures (matplotlib, no GUI: figures are drawn on Agg/SVG canvases and written as PNG and SVG).

- Robust accuracy vs ε, per data set and norm: one line per evaluated system
  (the lowest robust accuracy over every attack run on it at each ε), its 95%
  interval as a band, a ring where sanity flags fired.
- Certified accuracy vs L2 radius, per data set: one line per model, mode and
  σ (Cohen et al.'s figure), and a second figure with the envelope over σ.
- PSNR vs σ for the models measured by a `denoise` run, with the noisy input
  as reference.
- Per model: its attack runs (every attack and defense) and its certified
  curves with their envelope.

Colours come from the Okabe–Ito palette (safe for colour-blind readers); each
model keeps one colour (and marker) in every figure of a report. Every line
carries an SVG id (`curve-…`, `band-…`, `flag-…`) so tests and readers can
find it in the file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from robusteval.reports.loading import Run, certified_accuracy_from_records
from robusteval.reports.paths import slug
from robusteval.reports.tables import format_number
from robusteval.vocabulary import NORM_SYMBOL, NORMS

# Okabe & Ito (2008), ordered so that the first colours are the most distinct on white.
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")
REFERENCE_GREY = "#6E6E6E"
FLAG_EDGE = "#000000"
_RC = {
    "svg.fonttype": "none",  # text stays text: searchable, small, escaped by the SVG writer
    "svg.hashsalt": "robusteval",  # stable element ids: the same data gives the same file
    "font.size": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
}


@dataclass(frozen=True)
class Style:
    """How one model is drawn in every figure."""

    color: str
    marker: str
    linestyle: str


def model_styles(models: Iterable[str]) -> dict[str, Style]:
    """A fixed style per model (sorted by name): a palette colour, a marker, and a dash pattern after 8 models."""
    names = sorted(set(models))
    return {
        name: Style(OKABE_ITO[i % len(OKABE_ITO)], MARKERS[i % len(MARKERS)],
                    LINESTYLES[(i // len(OKABE_ITO)) % len(LINESTYLES)])
        for i, name in enumerate(names)
    }


def _text(value: str) -> str:
    """A user string shown literally (a '$' would otherwise start matplotlib's mathtext)."""
    return value.replace("$", r"\$")


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
    """The figures of one report: overall ones, and per model."""

    overall: list[FigureFile] = field(default_factory=list)
    per_model: dict[str, list[FigureFile]] = field(default_factory=dict)

    def all(self) -> list[FigureFile]:
        return [*self.overall, *(f for files in self.per_model.values() for f in files)]


def _new_figure(width: float = 7.6, height: float = 4.2) -> Figure:
    return Figure(figsize=(width, height), layout="constrained", dpi=100)


def _finish(fig: Figure, ax, title: str, xlabel: str, ylabel: str, handles: list, labels: list[str]) -> None:
    # A figure-wide title: an axes title would run under the legend.
    fig.suptitle(_text(title), fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if handles:
        # Outside the axes (right of them): the legend never hides data.
        ax.legend(handles, [_text(label) for label in labels], loc="upper left", bbox_to_anchor=(1.02, 1.0),
                  borderaxespad=0.0, frameon=False)


def save_figure(fig: Figure, stem: Path) -> tuple[Path, Path]:
    """Write `stem`.svg and `stem`.png (150 dpi); the files do not depend on the time they were made."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    # Not with_suffix: a model name like gaussian-s0.12 has a dot that is not a suffix.
    svg, png = stem.with_name(stem.name + ".svg"), stem.with_name(stem.name + ".png")
    with matplotlib.rc_context(_RC):
        fig.savefig(svg, format="svg", metadata={"Date": None})
        fig.savefig(png, format="png", dpi=150, metadata={"Software": None})
    return svg, png


# --- robust accuracy vs ε --------------------------------------------------------------------
@dataclass(frozen=True)
class RobustPoint:
    eps: float
    accuracy: float
    low: float
    high: float
    flagged: bool
    attack: str


def best_known_curve(runs: Sequence[Run]) -> list[RobustPoint]:
    """At each ε any run evaluated, the lowest robust accuracy over the runs (and that run's interval and flags).

    Sanity flags are about the whole run, so a flagged run marks every ε it supplies.
    """
    budgets = sorted({float(p["eps"]) for r in runs for p in r.summary["curve"]})
    curve = []
    for eps in budgets:
        candidates = [(r, r.robust_accuracy_at(eps)) for r in runs]
        run, point = min(((r, p) for r, p in candidates if p is not None),
                         key=lambda rp: (float(rp[1]["robust_accuracy"]), rp[0].attack_label))
        curve.append(RobustPoint(eps, float(point["robust_accuracy"]), float(point["ci_low"]),
                                 float(point["ci_high"]), bool(run.flags), run.attack_label))
    return curve


def _flag_handle() -> Line2D:
    return Line2D([], [], linestyle="none", marker="o", markersize=11, markerfacecolor="none",
                  markeredgecolor=FLAG_EDGE, markeredgewidth=1.4)


def _plot_robust(ax, curve: list[RobustPoint], style: Style, gid: str, linestyle: str | None = None,
                 band: bool = True) -> tuple[Line2D, bool]:
    eps = [p.eps for p in curve]
    (line,) = ax.plot(eps, [100 * p.accuracy for p in curve], color=style.color, marker=style.marker,
                      linestyle=linestyle or style.linestyle, linewidth=1.8, markersize=5)
    line.set_gid(f"curve-{gid}")
    if band:
        poly = ax.fill_between(eps, [100 * p.low for p in curve], [100 * p.high for p in curve],
                               color=style.color, alpha=0.15, linewidth=0)
        poly.set_gid(f"band-{gid}")
    flagged = [p for p in curve if p.flagged]
    if flagged:
        (rings,) = ax.plot([p.eps for p in flagged], [100 * p.accuracy for p in flagged], linestyle="none",
                           marker="o", markersize=11, markerfacecolor="none", markeredgecolor=FLAG_EDGE,
                           markeredgewidth=1.4)
        rings.set_gid(f"flag-{gid}")
    return line, bool(flagged)


def _robust_axes(ax) -> None:
    ax.set_ylim(-3, 103)
    ax.set_xlim(left=0)


def _eps_label(norm: str) -> str:
    return f"{NORM_SYMBOL[norm]} perturbation budget ε (pixel values in [0, 1])"


def robustness_figure(runs: Sequence[Run], dataset: str, norm: str, styles: dict[str, Style]) -> Figure:
    """Robust accuracy vs ε for one data set and norm: one line per system with its 95% band."""
    relevant = [r for r in runs if r.kind == "attack" and r.dataset == dataset and r.summary["norm"] == norm]
    if not relevant:
        raise ValueError(f"no attack runs for data set {dataset!r} and norm {norm!r}")
    systems: dict[str, list[Run]] = {}
    for run in relevant:
        systems.setdefault(run.system, []).append(run)
    fig = _new_figure()
    ax = fig.add_subplot()
    handles, labels, any_flag = [], [], False
    per_model_count: dict[str, int] = {}
    for system in sorted(systems):
        group = systems[system]
        model = group[0].model
        # A model shown with and without defenses: same colour, another dash pattern.
        index = per_model_count.get(model, 0)
        per_model_count[model] = index + 1
        linestyle = LINESTYLES[(LINESTYLES.index(styles[model].linestyle) + index) % len(LINESTYLES)]
        line, flagged = _plot_robust(ax, best_known_curve(group), styles[model], slug(system), linestyle)
        any_flag |= flagged
        handles.append(line)
        labels.append(system)
    if any_flag:
        handles.append(_flag_handle())
        labels.append("sanity flags fired (unreliable)")
    _robust_axes(ax)
    n = sorted({int(r.summary["n"]) for r in relevant})
    _finish(fig, ax, f"Robust accuracy vs ε: {dataset}, {NORM_SYMBOL[norm]} "
                     f"(best attack per ε, n = {', '.join(map(str, n))}, 95% CI)",
            _eps_label(norm), "robust accuracy (%)", handles, labels)
    return fig


def model_robustness_figure(runs: Sequence[Run], model: str, dataset: str, norm: str, style: Style) -> Figure:
    """One model's attack runs (every attack and defense) for a data set and norm, each with its band."""
    relevant = sorted((r for r in runs if r.kind == "attack" and r.model == model and r.dataset == dataset
                       and r.summary["norm"] == norm), key=lambda r: (r.system, r.attack_label))
    if not relevant:
        raise ValueError(f"no attack runs of {model!r} for data set {dataset!r} and norm {norm!r}")
    fig = _new_figure()
    ax = fig.add_subplot()
    handles, labels, any_flag = [], [], False
    for i, run in enumerate(relevant):
        curve = [RobustPoint(float(p["eps"]), float(p["robust_accuracy"]), float(p["ci_low"]), float(p["ci_high"]),
                             bool(run.flags), run.attack_label) for p in run.summary["curve"]]
        run_style = Style(style.color, MARKERS[i % len(MARKERS)], style.linestyle)
        line, flagged = _plot_robust(ax, curve, run_style, slug(f"{run.system}-{run.attack_label}"),
                                     LINESTYLES[i % len(LINESTYLES)])
        any_flag |= flagged
        handles.append(line)
        labels.append(f"{run.system}: {run.attack_label} (n = {run.summary['n']})")
    if any_flag:
        handles.append(_flag_handle())
        labels.append("sanity flags fired (unreliable)")
    _robust_axes(ax)
    _finish(fig, ax, f"{model}: robust accuracy vs ε, {dataset}, {NORM_SYMBOL[norm]} (95% CI)",
            _eps_label(norm), "robust accuracy (%)", handles, labels)
    return fig


# --- certified accuracy vs radius ------------------------------------------------------------
def certified_curve(run: Run, radii: np.ndarray) -> np.ndarray:
    """Certified accuracy (fraction) at each radius: from the per-image radii when recorded, else the summary grid."""
    counted = certified_accuracy_from_records(run, radii.tolist())
    if counted is not None:
        return np.asarray(counted)
    grid = sorted((float(p["radius"]), float(p["accuracy"])) for p in run.summary["certified_accuracy"])
    xs, ys = [g[0] for g in grid], [g[1] for g in grid]
    # Between grid points the curve is only known to lie between its neighbours: interpolate; beyond the grid, 0.
    values = np.interp(radii, xs, ys, right=0.0)
    values[radii > xs[-1] + 1e-12] = 0.0
    return values


def _radius_grid(runs: Sequence[Run]) -> np.ndarray:
    largest = 0.0
    for run in runs:
        largest = max(largest, max(float(p["radius"]) for p in run.summary["certified_accuracy"]))
        if run.records:
            largest = max(largest, max((float(r.get("radius") or 0.0) for r in run.records), default=0.0))
    top = max(0.5, largest * 1.05)
    return np.linspace(0.0, top, 241)


def _certify_groups(runs: Sequence[Run]) -> dict[tuple[str, str], list[Run]]:
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in sorted(runs, key=lambda r: (r.model, r.smoothing_mode, float(r.summary["sigma"]))):
        groups.setdefault((run.model, run.smoothing_mode), []).append(run)
    return groups


def _sigma_linestyles(runs: Sequence[Run]) -> dict[float, object]:
    dashes = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2))]
    sigmas = sorted({round(float(r.summary["sigma"]), 9) for r in runs})
    return {s: dashes[i % len(dashes)] for i, s in enumerate(sigmas)}


_RADIUS_LABEL = "certified L2 radius (pixel values in [0, 1])"


def certified_figure(runs: Sequence[Run], dataset: str, styles: dict[str, Style], model: str | None = None,
                     envelope: bool = False, per_sigma: bool = True) -> Figure:
    """Certified accuracy vs radius for a data set (or one model): a line per model, mode and σ and/or envelopes."""
    relevant = [r for r in runs if r.kind == "certify" and r.dataset == dataset and (model is None or r.model == model)]
    if not relevant:
        raise ValueError(f"no certify runs for data set {dataset!r}" + (f" and model {model!r}" if model else ""))
    radii = _radius_grid(relevant)
    sigma_styles = _sigma_linestyles(relevant)
    fig = _new_figure()
    ax = fig.add_subplot()
    handles, labels = [], []
    for (name, mode), group in _certify_groups(relevant).items():
        style = styles[name]
        curves = [certified_curve(r, radii) for r in group]
        if per_sigma:
            for run, values in zip(group, curves):
                sigma = float(run.summary["sigma"])
                (line,) = ax.plot(radii, 100 * values, color=style.color,
                                  linestyle=sigma_styles[round(sigma, 9)],
                                  linewidth=1.2 if envelope else 1.6,
                                  marker=style.marker if mode.startswith("denoised") else None, markevery=40, markersize=4)
                line.set_gid(f"curve-{slug(f'{name}-{mode}-{format_number(sigma)}')}")
                handles.append(line)
                labels.append(f"{name} ({mode}), σ = {format_number(sigma)}")
        if envelope:
            (line,) = ax.plot(radii, 100 * np.max(curves, axis=0), color=style.color, linewidth=3.0, alpha=0.85,
                              linestyle="-" if mode.startswith("direct") else "--")
            line.set_gid(f"envelope-{slug(f'{name}-{mode}')}")
            handles.append(line)
            labels.append(f"{name} ({mode}), envelope over σ")
    ax.set_ylim(-3, 103)
    ax.set_xlim(0, radii[-1])
    what = "envelope over σ" if envelope and not per_sigma else "per σ" + (" and envelope" if envelope else "")
    subject = f"{model}: " if model else ""
    n_images = sorted({int(r.summary["n_images"]) for r in relevant})
    _finish(fig, ax, f"{subject}certified accuracy vs radius, {dataset} ({what}, "
                     f"{', '.join(map(str, n_images))} images)",
            _RADIUS_LABEL, "certified accuracy (%)", handles, labels)
    return fig


# --- denoising -------------------------------------------------------------------------------
def psnr_figure(runs: Sequence[Run], dataset: str, styles: dict[str, Style]) -> Figure:
    """PSNR of each model's denoiser vs σ, with the noisy input's PSNR as reference."""
    relevant = sorted((r for r in runs if r.kind == "denoise" and r.dataset == dataset), key=lambda r: r.model)
    if not relevant:
        raise ValueError(f"no denoise runs for data set {dataset!r}")
    fig = _new_figure()
    ax = fig.add_subplot()
    handles, labels = [], []
    for run in relevant:
        points = sorted(run.summary["psnr"], key=lambda p: float(p["sigma"]))
        style = styles[run.model]
        (line,) = ax.plot([float(p["sigma"]) for p in points], [float(p["psnr"]) for p in points], color=style.color,
                          marker=style.marker, linestyle=style.linestyle, linewidth=1.8)
        line.set_gid(f"curve-{slug(run.model)}")
        handles.append(line)
        labels.append(run.model)
    # The noisy input's PSNR depends only on σ (up to the draws): one reference line, averaged over the runs.
    noisy_by_sigma: dict[float, list[float]] = {}
    for run in relevant:
        for point in run.summary["psnr"]:
            noisy_by_sigma.setdefault(float(point["sigma"]), []).append(float(point["psnr_noisy"]))
    sigmas = sorted(noisy_by_sigma)
    (noisy,) = ax.plot(sigmas, [float(np.mean(noisy_by_sigma[s])) for s in sigmas], color=REFERENCE_GREY,
                       linestyle="--", linewidth=1.2)
    noisy.set_gid("reference-noisy-input")
    handles.append(noisy)
    labels.append("noisy input (no denoising)")
    ax.set_xlim(left=0)
    _finish(fig, ax, f"Denoising: PSNR vs noise level, {dataset}", "noise level σ (std, pixel values in [0, 1])",
            "PSNR (dB)", handles, labels)
    return fig


# --- all figures of a report -----------------------------------------------------------------
def write_figures(runs: Sequence[Run], out_dir: str | Path, styles: dict[str, Style] | None = None) -> FigureSet:
    """Draw and write every figure the runs support; returns what was written."""
    out_dir = Path(out_dir)
    styles = styles or model_styles(r.model for r in runs)
    result = FigureSet()

    def emit(fig: Figure, name: str, title: str, dataset: str, model: str | None = None) -> None:
        svg, png = save_figure(fig, out_dir / name)
        entry = FigureFile(name, title, svg, png, dataset, model)
        if model is None:
            result.overall.append(entry)
        else:
            result.per_model.setdefault(model, []).append(entry)

    datasets = sorted({r.dataset for r in runs})
    for dataset in datasets:
        attack_runs = [r for r in runs if r.kind == "attack" and r.dataset == dataset]
        norms = [n for n in NORMS if any(r.summary["norm"] == n for r in attack_runs)]
        for norm in norms:
            emit(robustness_figure(runs, dataset, norm, styles), f"robust_{slug(dataset)}_{norm}",
                 f"Robust accuracy vs ε ({dataset}, {NORM_SYMBOL[norm]})", dataset)
        if any(r.kind == "certify" and r.dataset == dataset for r in runs):
            emit(certified_figure(runs, dataset, styles), f"certified_{slug(dataset)}",
                 f"Certified accuracy vs radius, per σ ({dataset})", dataset)
            emit(certified_figure(runs, dataset, styles, envelope=True, per_sigma=False),
                 f"certified_envelope_{slug(dataset)}", f"Certified accuracy vs radius, envelope over σ ({dataset})",
                 dataset)
        if any(r.kind == "denoise" and r.dataset == dataset for r in runs):
            emit(psnr_figure(runs, dataset, styles), f"psnr_{slug(dataset)}", f"Denoising PSNR vs σ ({dataset})",
                 dataset)
        for model in sorted({r.model for r in runs if r.dataset == dataset}):
            mine = [r for r in runs if r.model == model and r.dataset == dataset]
            for norm in NORMS:
                if any(r.kind == "attack" and r.summary["norm"] == norm for r in mine):
                    emit(model_robustness_figure(runs, model, dataset, norm, styles[model]),
                         f"model_{slug(model)}_robust_{slug(dataset)}_{norm}",
                         f"{model}: robust accuracy vs ε ({dataset}, {NORM_SYMBOL[norm]})", dataset, model)
            if any(r.kind == "certify" for r in mine):
                emit(certified_figure(runs, dataset, styles, model=model, envelope=True),
                     f"model_{slug(model)}_certified_{slug(dataset)}",
                     f"{model}: certified accuracy vs radius ({dataset})", dataset, model)
    return result
