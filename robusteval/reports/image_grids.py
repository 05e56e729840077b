"""PNG grids of images: model samples and counterfactual explanations (matplotlib, no display needed)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from robusteval.core.atomic_files import atomic_write_bytes


def _as_hwc(image: Tensor):
    """(C, H, W) in [0, 1] → an array matplotlib shows: (H, W) for grey, (H, W, C) for colour."""
    array = image.detach().float().clamp(0, 1).cpu().numpy()
    return array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)


def _save(figure, out: str | Path) -> Path:
    import matplotlib.pyplot as plt  # deferred: matplotlib costs ~1 s to import

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    out = Path(out)
    atomic_write_bytes(out, buffer.getvalue())
    return out


def _new_figure(rows: int, cols: int, cell: float):
    import matplotlib  # deferred: matplotlib costs ~1 s to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib costs ~1 s to import

    figure, axes = plt.subplots(rows, cols, figsize=(cols * cell, rows * cell), squeeze=False)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
        for spine in axis.spines.values():
            spine.set_visible(False)
    return figure, axes


def save_sample_grid(
    images: Tensor,
    out: str | Path,
    columns: int = 10,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Write images (N, C, H, W) in [0, 1] as a grid PNG, `columns` per row, optional labels on the left."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    rows = math.ceil(images.shape[0] / columns)
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"need one row label per row ({rows}), got {len(row_labels)}")
    figure, axes = _new_figure(rows, columns, 0.8)
    grey = images.shape[1] == 1
    for index, axis in enumerate(axes.flat):
        if index < images.shape[0]:
            axis.imshow(_as_hwc(images[index]), cmap="gray" if grey else None, vmin=0, vmax=1, interpolation="nearest")
    if row_labels is not None:
        for row, label in enumerate(row_labels):
            axes[row, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    return _save(figure, out)


def save_counterfactual_grid(
    originals: Tensor,
    counterfactuals: Tensor,
    original_captions: Sequence[str],
    counterfactual_captions: Sequence[str],
    out: str | Path,
    columns: int = 10,
    title: str | None = None,
) -> Path:
    """Write pairs of rows, originals above their counterfactuals, each image with a caption."""
    n = originals.shape[0]
    if counterfactuals.shape != originals.shape or len(original_captions) != n or len(counterfactual_captions) != n:
        raise ValueError("originals, counterfactuals and both caption lists must have one entry per image")
    if n == 0:
        raise ValueError("need at least one image")
    columns = min(columns, n)
    pair_rows = math.ceil(n / columns)
    figure, axes = _new_figure(2 * pair_rows, columns, 1.1)
    grey = originals.shape[1] == 1
    for index in range(n):
        row, col = divmod(index, columns)
        for offset, images, captions in ((0, originals, original_captions), (1, counterfactuals, counterfactual_captions)):
            axis = axes[2 * row + offset, col]
            axis.imshow(_as_hwc(images[index]), cmap="gray" if grey else None, vmin=0, vmax=1, interpolation="nearest")
            axis.set_title(captions[index], fontsize=7)
    for row in range(pair_rows):
        axes[2 * row, 0].set_ylabel("original", fontsize=8)
        axes[2 * row + 1, 0].set_ylabel("counterfactual", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, out)
