"""Randomized-smoothing certification (Cohen, Rosenfeld & Kolter 2019), batched across images and noise draws."""

from robusteval.smoothing.decisions import (
    average_certified_radius,
    certified_accuracy_curve,
    certify_decision,
    lower_confidence_bound,
    predict_decision,
)
from robusteval.smoothing.engine import (
    SmoothingJob,
    SmoothingResult,
    SmoothingSettings,
    certify,
    predict,
    prepare_smoothing,
)

__all__ = [
    "SmoothingJob",
    "SmoothingResult",
    "SmoothingSettings",
    "average_certified_radius",
    "certified_accuracy_curve",
    "certify",
    "certify_decision",
    "lower_confidence_bound",
    "predict",
    "predict_decision",
    "prepare_smoothing",
]
