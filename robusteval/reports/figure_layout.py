"""Figure layout and house style shared by every report figure.

Panels sharing both axes with the legend outside on the right (`panels`,
`finish`), the legend handles for a model's identity, the 95% band and the
sanity-flag ring, the matplotlib settings every figure is drawn and written
under (`styled`, `save_figure`), and the colours and labels they share.

Every model keeps one identity (colour and marker, `robusteval.reports.styles`)
in every figure; legends sit outside the plotting area, on the right, and list
each model once. Every line carries an SVG id (`curve-…`, `band-…`, `flag-…`,
`envelope-…`, `reference-…`, `cap-…`) so tests and readers can find it in the file.
"""

from __future__ import annotations

import functools
import math
import textwrap
from collections.abc import Callable
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from robusteval.reports.styles import Identity

REFERENCE_GREY = "#6E6E6E"
FLAG_EDGE = "#000000"

SIGMA_LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2)))
FLAG_LABEL = "sanity flag raised (see tables)"
BAND_LABEL = "shaded (or bar): 95% CI"
_RC = {
    "svg.fonttype": "none",  # text stays text: searchable, small, escaped by the SVG writer
    "svg.hashsalt": "robusteval",  # stable element ids: the same data gives the same file
    "font.size": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
}
# Size of one panel and of the legend column (inches).
_PANEL_W, _PANEL_H, _SINGLE_W, _SINGLE_H, _LEGEND_W, _TITLE_H = 3.5, 2.9, 6.4, 4.2, 2.4, 0.9


def styled(draw: Callable[..., Figure]) -> Callable[..., Figure]:
    """Build the figure under the house style: fonts, grid and the like are read when artists are made."""

    @functools.wraps(draw)
    def wrapper(*args, **kwargs) -> Figure:
        with matplotlib.rc_context(_RC):
            return draw(*args, **kwargs)

    return wrapper


def literal_text(value: str) -> str:
    """A user string shown literally (a '$' would otherwise start matplotlib's mathtext)."""
    return value.replace("$", r"\$")


# --- layout ----------------------------------------------------------------------------------
def panels(count: int, legend: bool) -> tuple[Figure, list]:
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


def finish(fig: Figure, axes: list, title: str, xlabel: str, ylabel: str, handles: list, labels: list[str]) -> None:
    """Title, axis labels and the shared legend of a panel figure."""
    fig.suptitle(literal_text(title), fontsize=11)
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
        labels = [textwrap.fill(literal_text(label), 34, subsequent_indent="  ") for label in labels]
        columns = math.ceil(len(handles) / rows_fit)
        fig.set_figwidth(fig.get_figwidth() + (columns - 1) * _LEGEND_W)  # a second column widens the figure
        fig.legend(handles, labels, loc="outside right center", frameon=False, ncols=columns, handlelength=2.6)


def identity_handle(identity: Identity, label: str) -> Line2D:
    """The legend entry of one model's line."""
    return Line2D([], [], color=identity.color, marker=identity.marker, linestyle="-", linewidth=1.8,
                  markersize=6, label=label)


def flag_handle() -> Line2D:
    """The legend entry of the ring marking a flagged point."""
    return Line2D([], [], linestyle="none", marker="o", markersize=11, markerfacecolor="none",
                  markeredgecolor=FLAG_EDGE, markeredgewidth=1.4, label=FLAG_LABEL)


def band_handle() -> Patch:
    """The legend entry of the grey reference band."""
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
