"""Robust accuracy vs ε figures.

Per data set and norm: the models without defense in one panel, each attacked
pipeline (denoise, noise, sgld, smooth) in a panel of its own with the same
axes; a line per system is the lowest robust accuracy over every attack run on
it at each ε, with its 95% interval as a light band and a ring where sanity
flags fired. Per model: its attack runs (every attack and defense).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from robusteval.core.vocabulary import NORM_SYMBOL
from robusteval.reports.figure_layout import (
    BAND_LABEL,
    FLAG_EDGE,
    FLAG_LABEL,
    REFERENCE_GREY,
    SIGMA_LINESTYLES,
    band_handle,
    finish,
    flag_handle,
    identity_handle,
    literal_text,
    panels,
    styled,
)
from robusteval.reports.loading import Run
from robusteval.reports.paths import slug
from robusteval.reports.styles import (
    Identity,
    pipeline_look,
    pipeline_order,
    pipeline_panel,
)

REFERENCE_LABEL = "faint: same model, no defense"


def band_alpha(series: int) -> float:
    """Opacity of a 95% band: light enough that the bands of every series in a panel do not bury the curves."""
    return max(0.02, min(0.12, 0.6 / max(1, series)))


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


@styled
def robustness_figure(runs: Sequence[Run], dataset: str, norm: str, identities: dict[str, Identity]) -> Figure:
    """Robust accuracy vs ε for one data set and norm.

    The models without defense share the first panel; each attacked pipeline (defense) gets a panel with
    the same axes, where each model's undefended curve is repeated faintly for reference.
    """
    relevant = [r for r in runs if r.kind == "attack" and r.dataset == dataset and r.summary["norm"] == norm]
    if not relevant:
        raise ValueError(f"no attack runs for data set {dataset!r} and norm {norm!r}")
    # Runs of one model with different SGLD chain settings keep panels of their own (their best curve is not one).
    specs: dict[tuple[str, str], set[str]] = {}
    for run in relevant:
        specs.setdefault((pipeline_panel(run.defense), run.model), set()).add(run.defense)
    by_defense: dict[str, dict[str, list[Run]]] = {}
    joined: set[str] = set()  # panels that hold more than one spec
    for run in relevant:
        panel = pipeline_panel(run.defense)
        panel = panel if len(specs[(panel, run.model)]) == 1 else run.defense
        if panel != run.defense:
            joined.add(panel)
        by_defense.setdefault(panel, {}).setdefault(run.model, []).append(run)
    defenses = sorted(by_defense, key=pipeline_order)
    models = sorted({r.model for r in relevant})
    base = {model: best_known_curve(group) for model, group in by_defense.get("none", {}).items()}
    single = len(defenses) == 1 and len(models) == 1
    fig, axes = panels(len(defenses), legend=not single)
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
            title = "no defense" if defense == "none" else f"+ {literal_text(defense)}"
            ax.set_title(title + (" (each model's chain step and noise)" if defense in joined else ""), fontsize=10)
        _robust_axes(ax)
    handles = [identity_handle(identities[m], m) for m in models]
    if not single:
        handles.append(band_handle())
    if any_reference:
        handles.append(Line2D([], [], color=REFERENCE_GREY, linewidth=1.0, alpha=0.5, label=REFERENCE_LABEL))
    if any_flag:
        handles.append(flag_handle())
    if single and len(handles) == 1:
        handles = []  # one model: its name is in the title
    n = sorted({int(r.summary["n"]) for r in relevant})
    subject = f"{models[0]}: r" if single else "R"
    finish(fig, axes, f"{subject}obust accuracy vs ε: {dataset}, {NORM_SYMBOL[norm]} "
                       f"(best attack per ε, n = {', '.join(map(str, n))}, 95% CI)",
            _eps_label(norm), "robust accuracy (%)", handles, [h.get_label() for h in handles])
    return fig


@styled
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
    fig, axes = panels(1, legend=not single)
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
    handles.append(band_handle())
    if any_flag:
        handles.append(flag_handle())
    what = "95% CI"
    if single:
        handles, what = [], f"{handles[0].get_label()}, 95% CI"
    _robust_axes(ax)
    finish(fig, axes, f"{model}: robust accuracy vs ε, {dataset}, {NORM_SYMBOL[norm]} ({what})",
            _eps_label(norm), "robust accuracy (%)", handles, [h.get_label() for h in handles])
    return fig
