"""What the sequential method adds to a certify run: its records and its summary figures.

A record is CERTIFY's with the draws the image used, the upper confidence
bound and the largest certified grid radius; the summary adds certified
accuracy at the grid radii, draws per image (mean, median, max) and the
forward passes in all (`robusteval.records.SequentialCertifySample`,
`SequentialFigures`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from robusteval.records import RadiusPoint, SequentialCertifySample, SequentialFigures
from robusteval.smoothing.sequential_sampler import SequentialImage


def sequential_record(index: int, label: int, result: SequentialImage, device: str | None = None) -> dict[str, Any]:
    """The samples.jsonl line of one image (prediction None when abstaining; device: where it was counted)."""
    outcome = result.outcome
    prediction = None if outcome.abstain else result.top_class
    return SequentialCertifySample(
        index=index, label=label, prediction=prediction, abstain=outcome.abstain, radius=outcome.radius,
        correct=prediction == label, pA_lower=outcome.pA_lower, count=outcome.successes, top_class=result.top_class,
        seconds=round(result.seconds, 4), pA_upper=outcome.pA_upper, draws=outcome.draws,
        largest_certified_radius=outcome.largest_certified_radius, device=device,
    ).to_json()


def sequential_figures(config: Mapping[str, Any], records: list[dict[str, Any]]) -> SequentialFigures:
    """Accuracy certified at each grid radius (0 first) and what the draws cost."""
    draws = np.array([int(r["draws"]) for r in records], dtype=np.int64)
    count = len(records)
    certified = [
        RadiusPoint(radius, sum(
            bool(r["correct"]) and r["largest_certified_radius"] is not None
            and r["largest_certified_radius"] >= radius for r in records) / count if count else 0.0)
        for radius in [0.0, *config["radii"]]
    ]
    per_image = {"mean": float(draws.mean()) if count else 0.0,
                 "median": float(np.median(draws)) if count else 0.0,
                 "max": int(draws.max()) if count else 0}
    return SequentialFigures(list(config["radii"]), config["n_max"], certified, per_image)


def sequential_forward_passes(config: Mapping[str, Any], records: list[dict[str, Any]]) -> int:
    """Base-classifier evaluations: n0 selection draws plus the estimation draws of every image."""
    return sum(int(r["draws"]) for r in records) + len(records) * int(config["n0"])
