"""Typed run records: what a run directory's config.json, samples.jsonl and summary.json hold.

`run_records` holds the sample and summary records of every kind of run, `configs`
the configurations, `encoding` how a record becomes JSON and `validation` the checks
of JSON read back.
"""

from robusteval.records.configs import AttackConfig, DenoiseConfig, SmoothingConfig
from robusteval.records.run_records import (
    AttackSample,
    AttackSummary,
    CertifySample,
    CurvePoint,
    DenoiseSample,
    DenoiseSummary,
    EpsOutcome,
    PredictSample,
    PsnrPoint,
    RadiusPoint,
    SequentialCertifySample,
    SequentialFigures,
    SmoothingSummary,
    Summary,
    summary_from_json,
)
from robusteval.records.validation import RecordFormatError

__all__ = [
    "AttackConfig", "AttackSample", "AttackSummary", "CertifySample", "CurvePoint", "DenoiseConfig",
    "DenoiseSample", "DenoiseSummary", "EpsOutcome", "PredictSample", "PsnrPoint", "RadiusPoint",
    "RecordFormatError", "SequentialCertifySample", "SequentialFigures", "SmoothingConfig", "SmoothingSummary",
    "Summary", "summary_from_json",
]
