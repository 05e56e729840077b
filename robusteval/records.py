"""Typed run records: what config.json, samples.jsonl and summary.json hold, for every kind of run.

The engines build these records and write their JSON (`to_json`); the reports
read them back (`summary_from_json`), which validates a summary against its
kind's contract. The JSON layout is the one the engines have always written,
so older run directories and the committed reports load unchanged:

- ``attack``  (`robusteval run`): model, dataset, n, attack, norm, defense,
  clean_accuracy, curve [{eps, robust_accuracy, ci_low, ci_high, broken_by,
  robust, rejected, standard_robust_accuracy, standard_robust,
  worst_of_n_robust_accuracy, worst_of_n_robust}] (the last six optional when
  reading: older runs have the attack's own figure only), flags, seconds, gradient, eot, seed, batch_size, checks,
  large_eps, notes (the last eight are optional when reading).
- ``certify`` (`robusteval certify`): model, dataset, mode, sigma, n0, n,
  alpha, n_images, certified_accuracy [{radius, accuracy}], acr,
  abstain_rate, seconds, skip, seed (+ batch_size, compile).
- ``predict`` (`robusteval predict`): as certify without n0 and the curve,
  with accuracy.
- ``denoise`` (`robusteval.denoising`): model, dataset, n_images, seed,
  psnr [{sigma, psnr, psnr_noisy}], seconds.

This module sits on the bottom layer: it imports nothing of robusteval but
the error type and the vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from robusteval.errors import UsageError
from robusteval.vocabulary import NORMS, RUN_KINDS


class RecordFormatError(UsageError):
    """A record (usually a summary.json) that breaks its kind's contract."""


def _json(record: Any) -> dict[str, Any]:
    """The fields of a record dataclass as a JSON-ready dict, in declaration order (nested records too)."""
    return {f.name: _plain(getattr(record, f.name)) for f in dataclasses.fields(record)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# --- configurations ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttackConfig:
    """config.json of an attack run: everything that fixes its results (what resume compares)."""

    model: str
    checkpoint: str | None
    model_fingerprint: str
    dataset: str
    n: int
    attack: str
    norm: str
    eps: list[float]
    defense: str
    gradient: str
    eot: int
    steps: int | None
    step_size: float | None
    seed: int
    batch_size: int
    device: str
    decision_draws: int
    large_eps_check: bool
    masking_checks: bool
    kind: str = "attack"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **{k: v for k, v in _json(self).items() if k != "kind"}}


@dataclass(frozen=True)
class SmoothingConfig:
    """config.json of a certify or predict run (the noise scheme names the generator, block layout and dtype)."""

    kind: str
    model: str
    dataset: str
    mode: str
    sigma: float
    n0: int
    n: int
    alpha: float
    n_images: int
    skip: int
    seed: int
    device_type: str
    noise: str
    checkpoint: str | None = None
    model_dir: str | None = None

    def to_json(self) -> dict[str, Any]:
        # Other weights are recorded only when given, so runs of the shipped weights keep their configuration.
        return {k: v for k, v in _json(self).items() if v is not None or k not in ("checkpoint", "model_dir")}


@dataclass(frozen=True)
class DenoiseConfig:
    """config.json of a denoise run."""

    model: str
    dataset: str
    sigmas: list[float]
    n_images: int
    seed: int
    batch_size: int
    kind: str = "denoise"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **{k: v for k, v in _json(self).items() if k != "kind"}}


# --- per-sample records -------------------------------------------------------------------------------
@dataclass(frozen=True)
class EpsOutcome:
    """What happened to one point at one ε."""

    eps: float
    broken: bool
    attack: str | None  # the component that broke it
    prediction: int
    perturbation_norm: float
    rejected: int  # candidates that fooled the model but failed verification
    # Broken by the attack's own components (AutoAttack's own result); None in records written before the engine
    # ran remedy stages, where it equals `broken`.
    standard_broken: bool | None = None
    # Randomized pipelines: fooled on at least one of the fresh decision draws (worst-of-N); None when deterministic.
    worst_broken: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return _json(self)


@dataclass(frozen=True)
class AttackSample:
    """One line of an attack run's samples.jsonl."""

    index: int
    batch: int
    label: int
    clean_prediction: int
    correct: bool
    gradient_masked: dict[str, bool] | None  # per gradient variant; None when not checked or not correct
    results: list[EpsOutcome]
    # Per gradient variant, why the cross-entropy gradient is blind ("saturation": the margin gradient is fine;
    # "no-gradient": the margin gradient is zero too), None where it is not; absent in older records.
    gradient_cause: dict[str, str | None] | None = None

    def to_json(self) -> dict[str, Any]:
        return _json(self)


@dataclass(frozen=True)
class CertifySample:
    """One line of a certify run's samples.jsonl (prediction None: abstained)."""

    index: int
    label: int
    prediction: int | None
    abstain: bool
    radius: float
    correct: bool
    pA_lower: float
    count: int
    top_class: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return _json(self)


@dataclass(frozen=True)
class PredictSample:
    """One line of a predict run's samples.jsonl."""

    index: int
    label: int
    prediction: int | None
    abstain: bool
    correct: bool
    count: int
    runner_up_count: int
    p_value: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return _json(self)


@dataclass(frozen=True)
class DenoiseSample:
    """One line of a denoise run's samples.jsonl: PSNR (dB) per σ of the denoised and of the noisy image."""

    index: int
    label: int
    psnr: list[float]
    psnr_noisy: list[float]

    def to_json(self) -> dict[str, Any]:
        return _json(self)


# --- summaries -------------------------------------------------------------------------------------------
def _fail(message: str) -> RecordFormatError:
    return RecordFormatError(message)


def _check_fraction(where: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
        raise _fail(f"{where} must be a fraction in [0, 1], got {value!r}")


def _check_count(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _fail(f"{key} must be a positive integer, got {value!r}")


def _check_points(data: dict[str, Any], list_key: str, point_keys: tuple[str, ...]) -> list[dict[str, Any]]:
    points = data[list_key]
    if not isinstance(points, list) or not points:
        raise _fail(f"{list_key} must be a non-empty list")
    for i, point in enumerate(points):
        if not isinstance(point, dict) or any(k not in point for k in point_keys):
            raise _fail(f"{list_key}[{i}] must be an object with {', '.join(point_keys)}")
        if any(not isinstance(point[k], (int, float)) or isinstance(point[k], bool) for k in point_keys):
            raise _fail(f"{list_key}[{i}] has a non-numeric value: {point}")
    return points


def _require(data: dict[str, Any], kind: str, keys: tuple[str, ...]) -> None:
    missing = [key for key in keys if key not in data]
    if missing:
        raise _fail(f"summary.json of a {kind} run lacks {', '.join(missing)}")


@dataclass
class CurvePoint:
    """Robust accuracy at one ε, with its 95% Clopper–Pearson interval and who broke the points."""

    eps: float
    robust_accuracy: float
    ci_low: float
    ci_high: float
    broken_by: dict[str, int]
    robust: int = 0
    rejected: int = 0
    # The attack's own figure (AutoAttack's for --attack autoattack, comparable with RobustBench); the
    # `robust_accuracy` above is the worst case over everything the engine ran (remedies, escalation included).
    standard_robust_accuracy: float | None = None
    standard_robust: int | None = None
    # Randomized pipelines: correct and never fooled on the fresh decision draws; None when deterministic.
    worst_of_n_robust_accuracy: float | None = None
    worst_of_n_robust: int | None = None

    def to_json(self) -> dict[str, Any]:
        return _json(self)

    # The name the attack engine's callers have used.
    as_dict = to_json

    @property
    def standard(self) -> float:
        """The attack's own robust accuracy (summaries written before the remedy stages: `robust_accuracy`)."""
        return self.robust_accuracy if self.standard_robust_accuracy is None else self.standard_robust_accuracy

    @classmethod
    def from_json(cls, point: dict[str, Any]) -> CurvePoint:
        return cls(float(point["eps"]), point["robust_accuracy"], point["ci_low"], point["ci_high"],
                   dict(point.get("broken_by") or {}), robust=point.get("robust", 0),
                   rejected=point.get("rejected", 0), standard_robust_accuracy=point.get("standard_robust_accuracy"),
                   standard_robust=point.get("standard_robust"),
                   worst_of_n_robust_accuracy=point.get("worst_of_n_robust_accuracy"),
                   worst_of_n_robust=point.get("worst_of_n_robust"))


@dataclass
class AttackSummary:
    """summary.json of an attack run. `curve[i].robust_accuracy` is over all n points."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("model", "dataset", "n", "attack", "norm", "defense", "clean_accuracy",
                                           "curve", "flags")

    model: str
    dataset: str
    n: int
    attack: str
    norm: str
    defense: str
    clean_accuracy: float
    curve: list[CurvePoint]
    flags: list[str]  # sanity-check findings, one line each (robusteval.attacks.sanity)
    seconds: float | None = None
    gradient: str | None = None
    eot: int | None = None
    seed: int | None = None
    batch_size: int | None = None
    checks: list[dict[str, str]] = field(default_factory=list)
    large_eps: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    kind: str = "attack"

    def to_json(self) -> dict[str, Any]:
        """Exactly what summary.json holds."""
        return {"kind": self.kind, **{f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(AttackSummary)
                                      if f.name != "kind"}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AttackSummary:
        _require(data, "attack", cls.REQUIRED)
        points = _check_points(data, "curve", ("eps", "robust_accuracy", "ci_low", "ci_high"))
        _check_count("n", data["n"])
        if data["norm"] not in NORMS:
            raise _fail(f"norm must be one of {', '.join(NORMS)}, got {data['norm']!r}")
        _check_fraction("clean_accuracy", data["clean_accuracy"])
        for i, point in enumerate(points):
            for key in ("robust_accuracy", "ci_low", "ci_high"):
                _check_fraction(f"curve[{i}].{key}", point[key])
            for key in ("standard_robust_accuracy", "worst_of_n_robust_accuracy"):
                if point.get(key) is not None:
                    _check_fraction(f"curve[{i}].{key}", point[key])
            if not point["ci_low"] - 1e-9 <= point["robust_accuracy"] <= point["ci_high"] + 1e-9:
                raise _fail(f"curve[{i}]: robust accuracy {point['robust_accuracy']} lies outside its "
                            f"interval [{point['ci_low']}, {point['ci_high']}]")
        if not isinstance(data["flags"], list) or not all(isinstance(flag, str) for flag in data["flags"]):
            raise _fail(f"flags must be a list of strings, got {data['flags']!r}")
        names = {f.name for f in dataclasses.fields(AttackSummary)} - {"curve"}
        fields = {k: v for k, v in data.items() if k in names}
        fields["checks"] = list(fields.get("checks") or [])
        fields["notes"] = list(fields.get("notes") or [])
        return cls(curve=[CurvePoint.from_json(p) for p in points], **fields)


@dataclass(frozen=True)
class RadiusPoint:
    radius: float
    accuracy: float

    def to_json(self) -> dict[str, Any]:
        return _json(self)


@dataclass(frozen=True)
class SmoothingSummary:
    """summary.json of a certify run (curve, ACR) or a predict run (accuracy); fields of the other kind are None."""

    kind: str
    model: str
    dataset: str
    mode: str
    sigma: float
    n: int
    alpha: float
    n_images: int
    abstain_rate: float
    seconds: float | None
    n0: int | None = None
    certified_accuracy: list[RadiusPoint] | None = None
    acr: float | None = None
    accuracy: float | None = None
    skip: int | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # run settings that do not change results (batch_size...)

    REQUIRED: ClassVar[dict[str, tuple[str, ...]]] = {
        "certify": ("model", "dataset", "mode", "sigma", "n0", "n", "alpha", "n_images", "certified_accuracy", "acr",
                    "abstain_rate"),
        "predict": ("model", "dataset", "mode", "sigma", "n", "alpha", "n_images", "accuracy", "abstain_rate"),
    }
    _ORDER: ClassVar[dict[str, tuple[str, ...]]] = {
        "certify": ("kind", "model", "dataset", "mode", "sigma", "n0", "n", "alpha", "n_images", "certified_accuracy",
                    "acr", "abstain_rate", "seconds", "skip", "seed"),
        "predict": ("kind", "model", "dataset", "mode", "sigma", "n", "alpha", "n_images", "accuracy", "abstain_rate",
                    "seconds", "skip", "seed"),
    }

    def to_json(self) -> dict[str, Any]:
        """Exactly what summary.json holds, in the order the engine has always written it."""
        return {**{key: _plain(getattr(self, key)) for key in self._ORDER[self.kind]}, **self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SmoothingSummary:
        kind = data.get("kind")
        if kind not in cls.REQUIRED:
            raise _fail(f"summary.json has kind {kind!r}; expected certify or predict")
        _require(data, kind, cls.REQUIRED[kind])
        for key in ("n0", "n", "n_images") if kind == "certify" else ("n", "n_images"):
            _check_count(key, data[key])
        curve = None
        if kind == "certify":
            points = _check_points(data, "certified_accuracy", ("radius", "accuracy"))
            for i, point in enumerate(points):
                _check_fraction(f"certified_accuracy[{i}].accuracy", point["accuracy"])
            curve = [RadiusPoint(float(p["radius"]), float(p["accuracy"])) for p in points]
        _check_fraction("abstain_rate", data["abstain_rate"])
        if float(data["sigma"]) <= 0:
            raise _fail(f"sigma must be positive, got {data['sigma']!r}")
        known = set(cls._ORDER[kind])
        return cls(kind=kind, model=data["model"], dataset=data["dataset"], mode=data["mode"], sigma=data["sigma"],
                   n=data["n"], alpha=data["alpha"], n_images=data["n_images"], abstain_rate=data["abstain_rate"],
                   seconds=data.get("seconds"), n0=data.get("n0"), certified_accuracy=curve, acr=data.get("acr"),
                   accuracy=data.get("accuracy"), skip=data.get("skip"), seed=data.get("seed"),
                   extra={k: v for k, v in data.items() if k not in known})


@dataclass(frozen=True)
class PsnrPoint:
    sigma: float
    psnr: float
    psnr_noisy: float

    def to_json(self) -> dict[str, Any]:
        return _json(self)


@dataclass(frozen=True)
class DenoiseSummary:
    """summary.json of a denoise run: mean per-image PSNR (dB, peak 1) of denoised and noisy images per σ."""

    model: str
    dataset: str
    n_images: int
    psnr: list[PsnrPoint]
    seed: int | None = None
    seconds: float | None = None
    kind: str = "denoise"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "dataset": self.dataset, "n_images": self.n_images,
                "seed": self.seed, "psnr": _plain(self.psnr), "seconds": self.seconds}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DenoiseSummary:
        _require(data, "denoise", ("model", "dataset", "n_images", "psnr"))
        points = _check_points(data, "psnr", ("sigma", "psnr", "psnr_noisy"))
        _check_count("n_images", data["n_images"])
        return cls(data["model"], data["dataset"], data["n_images"],
                   [PsnrPoint(float(p["sigma"]), float(p["psnr"]), float(p["psnr_noisy"])) for p in points],
                   seed=data.get("seed"), seconds=data.get("seconds"))


Summary = AttackSummary | SmoothingSummary | DenoiseSummary


def summary_from_json(data: Any, kinds: tuple[str, ...] = RUN_KINDS) -> Summary:
    """Parse and validate a summary.json of one of `kinds`; RecordFormatError says what breaks the contract."""
    if not isinstance(data, dict):
        raise _fail(f"summary.json must hold a JSON object, got {type(data).__name__}")
    kind = data.get("kind")
    if kind not in kinds:
        raise _fail(f"summary.json has kind {kind!r}; expected one of {', '.join(kinds)}")
    if kind == "attack":
        return AttackSummary.from_json(data)
    if kind == "denoise":
        return DenoiseSummary.from_json(data)
    return SmoothingSummary.from_json(data)
