"""Denoising figure: PSNR vs σ for the models measured by a `denoise` run, with the noisy input as reference."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from robusteval.reports.figure_layout import REFERENCE_GREY, finish, panels, styled
from robusteval.reports.loading import Run
from robusteval.reports.paths import slug
from robusteval.reports.styles import Identity


# --- denoising -------------------------------------------------------------------------------
@styled
def psnr_figure(runs: Sequence[Run], dataset: str, identities: dict[str, Identity]) -> Figure:
    """PSNR of each model's denoiser vs σ, with the noisy input's PSNR as reference."""
    relevant = sorted((r for r in runs if r.kind == "denoise" and r.dataset == dataset), key=lambda r: r.model)
    if not relevant:
        raise ValueError(f"no denoise runs for data set {dataset!r}")
    fig, axes = panels(1, legend=True)
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
    finish(fig, axes, f"Denoising: PSNR vs noise level, {dataset}", "noise level σ (std, pixel values in [0, 1])",
            "PSNR (dB)", handles, [h.get_label() for h in handles])
    return fig
