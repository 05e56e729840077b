"""Figures (matplotlib, no GUI: figures are drawn on Agg/SVG canvases and written as PNG and SVG).

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
"""

from __future__ import annotations

import functools
import math
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from scipy.stats import norm as gaussian

from robusteval.reports.loading import Run, certified_accuracy_from_records, same_number
from robusteval.reports.paths import slug
from robusteval.reports.styles import (
    MODE_LINESTYLES,
    Identity,
    model_identities,
    pipeline_look,
    pipeline_order,
    write_identities,
)
from robusteval.reports.tables import format_number
from robusteval.vocabulary import NORM_SYMBOL, NORMS

REFERENCE_GREY = "#6E6E6E"
FLAG_EDGE = "#000000"


def band_alpha(series: int) -> float:
    """Opacity of a 95% band: light enough that the bands of every series in a panel do not bury the curves."""
    return max(0.02, min(0.12, 0.6 / max(1, series)))

SIGMA_LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2)))
IDENTITIES_FILE = "identities.json"
FLAG_LABEL = "sanity flags fired (unreliable)"
BAND_LABEL = "shaded (or bar): 95% CI"
REFERENCE_LABEL = "faint: same model, no defense"
_RC = {
    "svg.fonttype": "none",  # text stays text: searchable, small, escaped by the SVG writer
    "svg.hashsalt": "robusteval",  # stable element ids: the same data gives the same file
    "font.size": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
}
# Size of one panel and of the legend column (inches).
_PANEL_W, _PANEL_H, _SINGLE_W, _SINGLE_H, _LEGEND_W, _TITLE_H = 3.5, 2.9, 6.4, 4.2, 2.4, 0.9


def _styled(draw: Callable[..., Figure]) -> Callable[..., Figure]:
    """Build the figure under the house style: fonts, grid and the like are read when artists are made."""

    @functools.wraps(draw)
    def wrapper(*args, **kwargs) -> Figure:
        with matplotlib.rc_context(_RC):
            return draw(*args, **kwargs)

    return wrapper


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
    """The figures of one report: overall ones, per model, and the model identities they use."""

    overall: list[FigureFile] = field(default_factory=list)
    per_model: dict[str, list[FigureFile]] = field(default_factory=dict)
    identities: Path | None = None

    def all(self) -> list[FigureFile]:
        return [*self.overall, *(f for files in self.per_model.values() for f in files)]


# --- layout ----------------------------------------------------------------------------------
def _panels(count: int, legend: bool) -> tuple[Figure, list]:
    """A figure with `count` panels sharing both axes (up to 3 per row), room on the right for a legend."""
    ncols = min(count, 3)
    nrows = math.ceil(count / ncols)
    if count == 1:
        width, height = _SINGLE_W, _SINGLE_H
    else:
        width, height = ncols * _PANEL_W, nrows * _PANEL_H + _TITLE_H
    fig = Figure(figsize=(width + (_LEGEND_W if legend else 0.0), height), layout="constrained", dpi=100)
    grid = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    axes = []
    for index, ax in enumerate(grid.flat):
        if index >= count:
            ax.remove()  # no empty panels
            continue
        row, col = divmod(index, ncols)
        # Tick labels on the outer edge, and under a panel with no panel below it.
        ax.tick_params(labelbottom=row == nrows - 1 or index + ncols >= count, labelleft=col == 0)
        axes.append(ax)
    return fig, axes


def _finish(fig: Figure, axes: list, title: str, xlabel: str, ylabel: str, handles: list, labels: list[str]) -> None:
    fig.suptitle(_text(title), fontsize=11)
    if len(axes) == 1:
        axes[0].set_xlabel(xlabel)
        axes[0].set_ylabel(ylabel)
    else:
        fig.supxlabel(xlabel, fontsize=10)
        fig.supylabel(ylabel, fontsize=10)
    if handles:
        # Outside on the right (the figure was widened for it): the legend never hides data.
        rows_fit = max(8, int(fig.get_figheight() / 0.21))
        # Long labels wrap: a wide legend would take its width from the plotting area.
        labels = [textwrap.fill(_text(label), 34, subsequent_indent="  ") for label in labels]
        columns = math.ceil(len(handles) / rows_fit)
        fig.set_figwidth(fig.get_figwidth() + (columns - 1) * _LEGEND_W)  # a second column widens the figure
        fig.legend(handles, labels, loc="outside right center", frameon=False, ncols=columns, handlelength=2.6)


def _identity_handle(identity: Identity, label: str) -> Line2D:
    return Line2D([], [], color=identity.color, marker=identity.marker, linestyle="-", linewidth=1.8,
                  markersize=6, label=label)


def _flag_handle() -> Line2D:
    return Line2D([], [], linestyle="none", marker="o", markersize=11, markerfacecolor="none",
                  markeredgecolor=FLAG_EDGE, markeredgewidth=1.4, label=FLAG_LABEL)


def _band_handle() -> Patch:
    return Patch(facecolor=REFERENCE_GREY, alpha=0.25, linewidth=0, label=BAND_LABEL)


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


def _plot_robust(ax, curve: list[RobustPoint], identity: Identity, gid: str, label: str, defense: str = "none",
                 linestyle: object | None = None, alpha: float = 0.12) -> tuple[Line2D, bool]:
    """One system's curve, its band and its flag rings; returns the curve and whether a flag fired."""
    eps = [p.eps for p in curve]
    dashes, fill = pipeline_look(defense)
    (line,) = ax.plot(eps, [100 * p.accuracy for p in curve], color=identity.color, marker=identity.marker,
                      fillstyle=fill, linestyle=linestyle or dashes, linewidth=1.6, markersize=6, zorder=3,
                      label=label)
    line.set_gid(f"curve-{gid}")
    if len(curve) > 1:
        band = ax.fill_between(eps, [100 * p.low for p in curve], [100 * p.high for p in curve],
                               color=identity.color, alpha=alpha, linewidth=0, zorder=1, label=BAND_LABEL)
    else:  # one budget (a pipeline attacked at the headline ε only): a band of no width shows nothing; a bar does
        band = ax.vlines(eps, [100 * curve[0].low], [100 * curve[0].high], colors=identity.color, alpha=0.45,
                         linewidth=1.2, zorder=1, label=BAND_LABEL)
    band.set_gid(f"band-{gid}")
    flagged = [p for p in curve if p.flagged]
    if flagged:
        (rings,) = ax.plot([p.eps for p in flagged], [100 * p.accuracy for p in flagged], linestyle="none",
                           marker="o", markersize=11, markerfacecolor="none", markeredgecolor=FLAG_EDGE,
                           markeredgewidth=1.4, zorder=4, label=FLAG_LABEL)
        rings.set_gid(f"flag-{gid}")
    return line, bool(flagged)


def _robust_axes(ax) -> None:
    ax.set_ylim(-3, 103)
    ax.set_xlim(left=0)


def _eps_label(norm: str) -> str:
    return f"{NORM_SYMBOL[norm]} perturbation budget ε (pixel values in [0, 1])"


@_styled
def robustness_figure(runs: Sequence[Run], dataset: str, norm: str, identities: dict[str, Identity]) -> Figure:
    """Robust accuracy vs ε for one data set and norm.

    The models without defense share the first panel; each attacked pipeline (defense) gets a panel with
    the same axes, where each model's undefended curve is repeated faintly for reference.
    """
    relevant = [r for r in runs if r.kind == "attack" and r.dataset == dataset and r.summary["norm"] == norm]
    if not relevant:
        raise ValueError(f"no attack runs for data set {dataset!r} and norm {norm!r}")
    by_defense: dict[str, dict[str, list[Run]]] = {}
    for run in relevant:
        by_defense.setdefault(run.defense, {}).setdefault(run.model, []).append(run)
    defenses = sorted(by_defense, key=pipeline_order)
    models = sorted({r.model for r in relevant})
    base = {model: best_known_curve(group) for model, group in by_defense.get("none", {}).items()}
    single = len(defenses) == 1 and len(models) == 1
    fig, axes = _panels(len(defenses), legend=not single)
    any_flag = any_reference = False
    for ax, defense in zip(axes, defenses):
        for model in sorted(by_defense[defense]):
            identity = identities[model]
            if defense != "none" and model in base:
                reference = base[model]
                (faint,) = ax.plot([p.eps for p in reference], [100 * p.accuracy for p in reference],
                                   color=identity.color, linewidth=1.0, alpha=0.35, zorder=2, label=REFERENCE_LABEL)
                faint.set_gid(f"reference-{slug(model)}-{slug(defense)}")
                any_reference = True
            system = by_defense[defense][model][0].system
            _, flagged = _plot_robust(ax, best_known_curve(by_defense[defense][model]), identity, slug(system),
                                      model, defense, alpha=band_alpha(len(by_defense[defense])))
            any_flag |= flagged
        if len(defenses) > 1:
            ax.set_title("no defense" if defense == "none" else f"+ {_text(defense)}", fontsize=10)
        _robust_axes(ax)
    handles = [_identity_handle(identities[m], m) for m in models]
    if not single:
        handles.append(_band_handle())
    if any_reference:
        handles.append(Line2D([], [], color=REFERENCE_GREY, linewidth=1.0, alpha=0.5, label=REFERENCE_LABEL))
    if any_flag:
        handles.append(_flag_handle())
    if single and len(handles) == 1:
        handles = []  # one model: its name is in the title
    n = sorted({int(r.summary["n"]) for r in relevant})
    subject = f"{models[0]}: r" if single else "R"
    _finish(fig, axes, f"{subject}obust accuracy vs ε: {dataset}, {NORM_SYMBOL[norm]} "
                       f"(best attack per ε, n = {', '.join(map(str, n))}, 95% CI)",
            _eps_label(norm), "robust accuracy (%)", handles, [h.get_label() for h in handles])
    return fig


@_styled
def model_robustness_figure(runs: Sequence[Run], model: str, dataset: str, norm: str, identity: Identity) -> Figure:
    """One model's attack runs (every attack and defense) for a data set and norm, each with its band.

    The model's colour and marker throughout; the pipeline sets dash pattern and marker fill, and a second
    attack on the same pipeline another dash pattern.
    """
    relevant = sorted((r for r in runs if r.kind == "attack" and r.model == model and r.dataset == dataset
                       and r.summary["norm"] == norm),
                      key=lambda r: (pipeline_order(r.defense), r.attack_label))
    if not relevant:
        raise ValueError(f"no attack runs of {model!r} for data set {dataset!r} and norm {norm!r}")
    # One run without flags: a single plot, no legend; the title says what it is.
    single = len(relevant) == 1 and not relevant[0].flags
    fig, axes = _panels(1, legend=not single)
    ax = axes[0]
    handles, any_flag, seen = [], False, {}
    for run in relevant:
        curve = [RobustPoint(float(p["eps"]), float(p["robust_accuracy"]), float(p["ci_low"]), float(p["ci_high"]),
                             bool(run.flags), run.attack_label) for p in run.summary["curve"]]
        repeat = seen.get(run.defense, 0)
        seen[run.defense] = repeat + 1
        dashes = (pipeline_look(run.defense)[0] if repeat == 0
                  else SIGMA_LINESTYLES[(repeat + 2) % len(SIGMA_LINESTYLES)])
        pipeline = "no defense" if run.defense == "none" else f"+ {run.defense}"
        label = f"{pipeline}: {run.attack_label} (n = {run.summary['n']})"
        line, flagged = _plot_robust(ax, curve, identity, slug(f"{run.system}-{run.attack_label}"), label,
                                     run.defense, dashes, band_alpha(len(relevant)))
        any_flag |= flagged
        handles.append(line)
    handles.append(_band_handle())
    if any_flag:
        handles.append(_flag_handle())
    what = "95% CI"
    if single:
        handles, what = [], f"{handles[0].get_label()}, 95% CI"
    _robust_axes(ax)
    _finish(fig, axes, f"{model}: robust accuracy vs ε, {dataset}, {NORM_SYMBOL[norm]} ({what})",
            _eps_label(norm), "robust accuracy (%)", handles, [h.get_label() for h in handles])
    return fig


# --- certified accuracy vs radius ------------------------------------------------------------
def largest_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest L2 radius CERTIFY can return with n noise draws at level α: σ·Φ⁻¹(α^(1/n)).

    With all n votes for one class, the one-sided Clopper–Pearson lower bound on its probability is
    α^(1/n) (the α-quantile of Beta(n, 1)); no run with this n can certify beyond σ·Φ⁻¹ of that.
    """
    if sigma <= 0 or n <= 0 or not 0 < alpha < 1:
        raise ValueError(f"need sigma > 0, n > 0 and 0 < alpha < 1, got {sigma}, {n}, {alpha}")
    return float(sigma * gaussian.ppf(alpha ** (1.0 / n)))


def _cap(run: Run) -> tuple[float, int, float, float]:
    sigma, n, alpha = float(run.summary["sigma"]), int(run.summary["n"]), float(run.summary["alpha"])
    return (sigma, n, alpha, largest_certifiable_radius(sigma, n, alpha))


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
    """Radii from 0 to past both the largest radius reached and the largest certifiable one."""
    largest = 0.0
    for run in runs:
        largest = max(largest, max(float(p["radius"]) for p in run.summary["certified_accuracy"]), _cap(run)[3])
        if run.records:
            largest = max(largest, max((float(r.get("radius") or 0.0) for r in run.records), default=0.0))
    top = max(0.5, largest * 1.05)
    return np.linspace(0.0, top, 241)


def _mark_caps(ax, caps: Sequence[tuple[float, int, float, float]], label_sigma: bool, direct: bool = False,
               panel: str = "") -> None:
    """A dotted vertical line at each largest certifiable radius, labelled with its σ when several, or in
    full (`direct`) when the figure has no legend to explain it."""
    for sigma, n, alpha, radius in sorted(set(caps)):
        line = ax.axvline(radius, color=REFERENCE_GREY, linestyle=(0, (1, 2)), linewidth=1.1, zorder=1,
                          label=_cap_label(caps))
        line.set_gid(f"cap-{slug(f'{panel}{format_number(sigma)}-{n}-{alpha:g}')}")  # ids unique per figure
        if label_sigma or direct:
            text = f"largest radius n = {n} can certify" if direct else f"σ={format_number(sigma)}"
            ax.annotate(text, (radius, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(-2, -2), textcoords="offset points", ha="right", va="top", fontsize=8,
                        color=REFERENCE_GREY)


def _cap_label(caps: Sequence[tuple[float, int, float, float]]) -> str:
    ns = ", ".join(str(n) for n in sorted({c[1] for c in caps}))
    return f"dotted: largest radius n = {ns} can certify"


def _certified_axes(ax, radii: np.ndarray) -> None:
    ax.set_ylim(-3, 103)
    ax.set_xlim(0, radii[-1])


_RADIUS_LABEL = "certified L2 radius (pixel values in [0, 1])"
_MODE_LABELS = {"direct": "solid: direct", "denoised": "dashed: denoised",
                "direct, sequential": "dash-dot: direct, sequential",
                "denoised, sequential": "dash-dot-dot: denoised, sequential"}
# The sequential method's curves (mode "direct, sequential" ...) are another evaluation than CERTIFY's at the
# same mode: a variant of the base mode's style, so a model certified both ways shows two distinct lines.
_SEQUENTIAL_LINESTYLES = {"direct": "-.", "denoised": (0, (3, 1, 1, 1, 1, 1))}


def _mode_linestyle(mode: str) -> object:
    """The line style of a certify group's mode (`Run.smoothing_mode`: the base mode, ", sequential" or not)."""
    base, _, method = mode.partition(", ")
    return (_SEQUENTIAL_LINESTYLES if method else MODE_LINESTYLES).get(base, "-.")


def _mode_order(mode: str) -> tuple[int, str, str]:
    base, _, method = mode.partition(", ")
    return (list(MODE_LINESTYLES).index(base) if base in MODE_LINESTYLES else len(MODE_LINESTYLES), method, mode)


def _mode_handles(modes: set[str]) -> list[Line2D]:
    order = sorted(modes, key=_mode_order)
    return [Line2D([], [], color=REFERENCE_GREY, linestyle=_mode_linestyle(mode), linewidth=1.6,
                   label=_MODE_LABELS.get(mode, mode)) for mode in order]


def _until_zero(radii: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The curve up to the first radius where it reaches 0 for good: zero tails of a dozen curves would stack
    their markers on the x axis."""
    positive = np.flatnonzero(values > 0)
    end = min(len(values), (positive[-1] + 2) if positive.size else 1)
    return radii[:end], values[:end]


def _markevery(identity: Identity, count: int) -> tuple[int, int]:
    # Markers spaced along the curve, offset per model so that markers of overlapping curves do not stack.
    step = max(1, count // 6)
    return (identity.slot * 7 % step, step)


def _certified_line(ax, radii, values, identity: Identity, mode: str, gid: str, label: str, linewidth: float,
                    linestyle: object | None = None) -> Line2D:
    radii, values = _until_zero(radii, values)
    (line,) = ax.plot(radii, 100 * values, color=identity.color, marker=identity.marker,
                      markevery=_markevery(identity, len(radii)), markersize=5,
                      linestyle=linestyle or _mode_linestyle(mode), linewidth=linewidth, zorder=3,
                      label=label)
    line.set_gid(gid)
    return line


def _certify_groups(runs: Sequence[Run]) -> dict[tuple[str, str], list[Run]]:
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in sorted(runs, key=lambda r: (r.model, _mode_order(r.smoothing_mode), float(r.summary["sigma"]))):
        groups.setdefault((run.model, run.smoothing_mode), []).append(run)
    return groups


def _certify_runs(runs: Sequence[Run], dataset: str, model: str | None = None) -> list[Run]:
    relevant = [r for r in runs if r.kind == "certify" and r.dataset == dataset and (model is None or r.model == model)]
    if not relevant:
        raise ValueError(f"no certify runs for data set {dataset!r}" + (f" and model {model!r}" if model else ""))
    return relevant


def _images(runs: Sequence[Run]) -> str:
    return ", ".join(map(str, sorted({int(r.summary["n_images"]) for r in runs})))


@_styled
def certified_figure(runs: Sequence[Run], dataset: str, identities: dict[str, Identity]) -> Figure:
    """Certified accuracy vs radius, a panel per σ (shared axes): a line per model and mode."""
    relevant = _certify_runs(runs, dataset)
    radii = _radius_grid(relevant)
    sigmas = sorted({round(float(r.summary["sigma"]), 9) for r in relevant})
    models = sorted({r.model for r in relevant})
    modes = {r.smoothing_mode for r in relevant}
    single = len(models) == 1 and len(modes) == 1 and len(sigmas) == 1
    fig, axes = _panels(len(sigmas), legend=not single)
    for ax, sigma in zip(axes, sigmas):
        mine = [r for r in relevant if same_number(r.summary["sigma"], sigma)]
        for run in sorted(mine, key=lambda r: (r.model, _mode_order(r.smoothing_mode))):
            mode = run.smoothing_mode
            _certified_line(ax, radii, certified_curve(run, radii), identities[run.model], mode,
                            f"curve-{slug(f'{run.model}-{mode}-{format_number(sigma)}')}", run.model, 1.5)
        _mark_caps(ax, [_cap(r) for r in mine], label_sigma=False, direct=single)
        if len(sigmas) > 1:
            ax.set_title(f"σ = {format_number(sigma)}", fontsize=10)
        _certified_axes(ax, radii)
    handles = [] if single else [_identity_handle(identities[m], m) for m in models]
    if not single:
        handles += _mode_handles(modes)
    if not single:
        handles.append(Line2D([], [], color=REFERENCE_GREY, linestyle=(0, (1, 2)), linewidth=1.1,
                              label=_cap_label([_cap(r) for r in relevant])))
    subject = f"{models[0]} ({next(iter(modes))}): c" if single else "C"
    which = f"σ = {format_number(sigmas[0])}" if single else "per σ"
    _finish(fig, axes, f"{subject}ertified accuracy vs radius, {dataset}, {which} ({_images(relevant)} images)",
            _RADIUS_LABEL, "certified accuracy (%)", handles, [h.get_label() for h in handles])
    return fig


@_styled
def certified_envelope_figure(runs: Sequence[Run], dataset: str, identities: dict[str, Identity]) -> Figure:
    """Each model's certified accuracy at its best σ at every radius (envelope over σ), direct and denoised."""
    relevant = _certify_runs(runs, dataset)
    radii = _radius_grid(relevant)
    groups = _certify_groups(relevant)
    models = sorted({model for model, _ in groups})
    modes = {mode for _, mode in groups}
    fig, axes = _panels(1, legend=True)
    ax = axes[0]
    for (name, mode), group in groups.items():
        envelope = np.max([certified_curve(r, radii) for r in group], axis=0)
        _certified_line(ax, radii, envelope, identities[name], mode, f"envelope-{slug(f'{name}-{mode}')}", name, 1.8)
    caps = [_cap(r) for r in relevant]
    _mark_caps(ax, caps, label_sigma=len({c[0] for c in caps}) > 1)
    _certified_axes(ax, radii)
    handles = [_identity_handle(identities[m], m) for m in models] + _mode_handles(modes)
    handles.append(Line2D([], [], color=REFERENCE_GREY, linestyle=(0, (1, 2)), linewidth=1.1, label=_cap_label(caps)))
    _finish(fig, axes, f"Certified accuracy vs radius, {dataset} (envelope over σ, {_images(relevant)} images)",
            _RADIUS_LABEL, "certified accuracy (%)", handles, [h.get_label() for h in handles])
    return fig


@_styled
def model_certified_figure(runs: Sequence[Run], model: str, dataset: str, identity: Identity) -> Figure:
    """One model's certified curves, a panel per mode: a line per σ and the envelope over σ.

    A model certified at one σ in one mode gets a single plot: its line in its identity, no legend.
    """
    relevant = _certify_runs(runs, dataset, model)
    radii = _radius_grid(relevant)
    groups = _certify_groups(relevant)
    sigmas = sorted({round(float(r.summary["sigma"]), 9) for r in relevant})
    dashes = {s: SIGMA_LINESTYLES[i % len(SIGMA_LINESTYLES)] for i, s in enumerate(sigmas)}
    single = len(relevant) == 1
    fig, axes = _panels(len(groups), legend=not single)
    handles = []
    for ax, ((_, mode), group) in zip(axes, groups.items()):
        curves = [certified_curve(r, radii) for r in group]
        for run, values in zip(group, curves):
            sigma = round(float(run.summary["sigma"]), 9)
            gid = f"curve-{slug(f'{model}-{mode}-{format_number(sigma)}')}"
            label = f"σ = {format_number(sigma)}"
            if single:
                _certified_line(ax, radii, values, identity, mode, gid, label, 1.6, "-")
                continue
            (line,) = ax.plot(*_until_zero(radii, 100 * values), color=identity.color, linestyle=dashes[sigma],
                              linewidth=1.2, zorder=2, label=label)
            line.set_gid(gid)
            if label not in [h.get_label() for h in handles]:
                handles.append(line)
        if len(group) > 1:
            envelope = _certified_line(ax, radii, np.max(curves, axis=0), identity, mode,
                                       f"envelope-{slug(f'{model}-{mode}')}", "thick: envelope over σ", 3.0, "-")
            envelope.set_alpha(0.55)
            if envelope.get_label() not in [h.get_label() for h in handles]:
                handles.append(envelope)
        caps = [_cap(r) for r in group]
        _mark_caps(ax, caps, label_sigma=len(caps) > 1, direct=single, panel=f"{mode}-")
        if len(groups) > 1:
            ax.set_title(f"{mode} certification", fontsize=10)
        _certified_axes(ax, radii)
    if not single:
        handles.append(Line2D([], [], color=REFERENCE_GREY, linestyle=(0, (1, 2)), linewidth=1.1,
                              label=_cap_label([_cap(r) for r in relevant])))
    only = ""
    if len(groups) == 1:
        only = f" ({relevant[0].smoothing_mode}" + (f", σ = {format_number(sigmas[0])})" if single else ")")
    _finish(fig, axes, f"{model}{only}: certified accuracy vs radius, {dataset} ({_images(relevant)} images)",
            _RADIUS_LABEL, "certified accuracy (%)", handles, [h.get_label() for h in handles])
    return fig


# --- denoising -------------------------------------------------------------------------------
@_styled
def psnr_figure(runs: Sequence[Run], dataset: str, identities: dict[str, Identity]) -> Figure:
    """PSNR of each model's denoiser vs σ, with the noisy input's PSNR as reference."""
    relevant = sorted((r for r in runs if r.kind == "denoise" and r.dataset == dataset), key=lambda r: r.model)
    if not relevant:
        raise ValueError(f"no denoise runs for data set {dataset!r}")
    fig, axes = _panels(1, legend=True)
    ax = axes[0]
    handles = []
    for run in relevant:
        points = sorted(run.summary["psnr"], key=lambda p: float(p["sigma"]))
        identity = identities[run.model]
        (line,) = ax.plot([float(p["sigma"]) for p in points], [float(p["psnr"]) for p in points],
                          color=identity.color, marker=identity.marker, linewidth=1.8, label=run.model)
        line.set_gid(f"curve-{slug(run.model)}")
        handles.append(line)
    # The noisy input's PSNR depends only on σ (up to the draws): one reference line, averaged over the runs.
    noisy_by_sigma: dict[float, list[float]] = {}
    for run in relevant:
        for point in run.summary["psnr"]:
            noisy_by_sigma.setdefault(float(point["sigma"]), []).append(float(point["psnr_noisy"]))
    sigmas = sorted(noisy_by_sigma)
    (noisy,) = ax.plot(sigmas, [float(np.mean(noisy_by_sigma[s])) for s in sigmas], color=REFERENCE_GREY,
                       linestyle="--", linewidth=1.2, label="noisy input (no denoising)")
    noisy.set_gid("reference-noisy-input")
    handles.append(noisy)
    ax.set_xlim(left=0)
    _finish(fig, axes, f"Denoising: PSNR vs noise level, {dataset}", "noise level σ (std, pixel values in [0, 1])",
            "PSNR (dB)", handles, [h.get_label() for h in handles])
    return fig


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
