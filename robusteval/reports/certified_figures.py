"""Certified accuracy vs L2 radius figures.

Per data set: a panel per σ (Cohen et al.'s figure), and one panel with each
model's envelope over σ; direct and denoised certification differ by line
style, and the largest radius a run can certify (σ·Φ⁻¹(α^(1/n)), where all n
votes for one class land) is marked. Per model: its certified curves with
their envelope.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy.stats import norm as gaussian

from robusteval.reports.figure_layout import (
    REFERENCE_GREY,
    SIGMA_LINESTYLES,
    finish,
    identity_handle,
    panels,
    styled,
)
from robusteval.reports.loading import Run, certified_accuracy_from_records, same_number
from robusteval.reports.paths import slug
from robusteval.reports.styles import MODE_LINESTYLES, Identity
from robusteval.reports.tables import format_number


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


@styled
def certified_figure(runs: Sequence[Run], dataset: str, identities: dict[str, Identity]) -> Figure:
    """Certified accuracy vs radius, a panel per σ (shared axes): a line per model and mode."""
    relevant = _certify_runs(runs, dataset)
    radii = _radius_grid(relevant)
    sigmas = sorted({round(float(r.summary["sigma"]), 9) for r in relevant})
    models = sorted({r.model for r in relevant})
    modes = {r.smoothing_mode for r in relevant}
    single = len(models) == 1 and len(modes) == 1 and len(sigmas) == 1
    fig, axes = panels(len(sigmas), legend=not single)
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
    handles = [] if single else [identity_handle(identities[m], m) for m in models]
    if not single:
        handles += _mode_handles(modes)
    if not single:
        handles.append(Line2D([], [], color=REFERENCE_GREY, linestyle=(0, (1, 2)), linewidth=1.1,
                              label=_cap_label([_cap(r) for r in relevant])))
    subject = f"{models[0]} ({next(iter(modes))}): c" if single else "C"
    which = f"σ = {format_number(sigmas[0])}" if single else "per σ"
    finish(fig, axes, f"{subject}ertified accuracy vs radius, {dataset}, {which} ({_images(relevant)} images)",
            _RADIUS_LABEL, "certified accuracy (%)", handles, [h.get_label() for h in handles])
    return fig


@styled
def certified_envelope_figure(runs: Sequence[Run], dataset: str, identities: dict[str, Identity]) -> Figure:
    """Each model's certified accuracy at its best σ at every radius (envelope over σ), direct and denoised."""
    relevant = _certify_runs(runs, dataset)
    radii = _radius_grid(relevant)
    groups = _certify_groups(relevant)
    models = sorted({model for model, _ in groups})
    modes = {mode for _, mode in groups}
    fig, axes = panels(1, legend=True)
    ax = axes[0]
    for (name, mode), group in groups.items():
        envelope = np.max([certified_curve(r, radii) for r in group], axis=0)
        _certified_line(ax, radii, envelope, identities[name], mode, f"envelope-{slug(f'{name}-{mode}')}", name, 1.8)
    caps = [_cap(r) for r in relevant]
    _mark_caps(ax, caps, label_sigma=len({c[0] for c in caps}) > 1)
    _certified_axes(ax, radii)
    handles = [identity_handle(identities[m], m) for m in models] + _mode_handles(modes)
    handles.append(Line2D([], [], color=REFERENCE_GREY, linestyle=(0, (1, 2)), linewidth=1.1, label=_cap_label(caps)))
    finish(fig, axes, f"Certified accuracy vs radius, {dataset} (envelope over σ, {_images(relevant)} images)",
            _RADIUS_LABEL, "certified accuracy (%)", handles, [h.get_label() for h in handles])
    return fig


@styled
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
    fig, axes = panels(len(groups), legend=not single)
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
    finish(fig, axes, f"{model}{only}: certified accuracy vs radius, {dataset} ({_images(relevant)} images)",
            _RADIUS_LABEL, "certified accuracy (%)", handles, [h.get_label() for h in handles])
    return fig
