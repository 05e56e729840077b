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
  abstain_rate, seconds, forward_passes, skip, seed (+ batch_size, compile);
  the sequential method adds method, radii, n_max, grid_certified_accuracy
  and draws_per_image {mean, median, max} (its n is n_max).
- ``predict`` (`robusteval predict`): as certify without n0 and the curve,
  with accuracy.
- ``denoise`` (`robusteval.generative.denoising`): model, dataset, n_images, seed,
  psnr [{sigma, psnr, psnr_noisy}], seconds.

This module imports nothing of robusteval but its package's checks (`validation`, with the
error type), JSON helper (`encoding`) and configurations (`configs`), and the vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from robusteval.core.vocabulary import NORMS, RUN_KINDS
from robusteval.records.configs import AttackConfig, DenoiseConfig, SmoothingConfig  # noqa: F401
from robusteval.records.encoding import plain as _plain
from robusteval.records.encoding import to_json_dict as _json
from robusteval.records.validation import (  # noqa: F401 (RecordFormatError: part of this module's interface)
    RecordFormatError,
    check_count,
    check_fraction,
    check_points,
    fail,
    require,
)


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


class _DeviceRecorded:
    """A sample record whose `device` (where it was computed) is left out of its JSON when unknown, as in
    records made before devices were recorded."""

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in _json(self).items() if v is not None or k != "device"}


@dataclass(frozen=True)
class AttackSample(_DeviceRecorded):
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
    device: str | None = None  # where its batch ran (cpu, cuda:0, ...); absent in records made before


@dataclass(frozen=True)
class CertifySample(_DeviceRecorded):
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
    device: str | None = None  # where it was counted (cpu, cuda:0, ...); absent in records made before


# kw_only: its fields follow CertifySample's defaulted `device`.
@dataclass(frozen=True, kw_only=True)
class SequentialCertifySample(CertifySample):
    """A sequential certify run's line: CERTIFY's (count: ĉ among the draws used) plus the upper bound, the
    estimation draws used and the largest certified grid radius (None when abstaining)."""

    pA_upper: float
    draws: int
    largest_certified_radius: float | None


@dataclass(frozen=True)
class PredictSample(_DeviceRecorded):
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
    device: str | None = None  # where it was counted (cpu, cuda:0, ...); absent in records made before


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
        require(data, "attack", cls.REQUIRED)
        points = check_points(data, "curve", ("eps", "robust_accuracy", "ci_low", "ci_high"))
        check_count("n", data["n"])
        if data["norm"] not in NORMS:
            raise fail(f"norm must be one of {', '.join(NORMS)}, got {data['norm']!r}")
        check_fraction("clean_accuracy", data["clean_accuracy"])
        for i, point in enumerate(points):
            for key in ("robust_accuracy", "ci_low", "ci_high"):
                check_fraction(f"curve[{i}].{key}", point[key])
            for key in ("standard_robust_accuracy", "worst_of_n_robust_accuracy"):
                if point.get(key) is not None:
                    check_fraction(f"curve[{i}].{key}", point[key])
            if not point["ci_low"] - 1e-9 <= point["robust_accuracy"] <= point["ci_high"] + 1e-9:
                raise fail(f"curve[{i}]: robust accuracy {point['robust_accuracy']} lies outside its "
                            f"interval [{point['ci_low']}, {point['ci_high']}]")
        if not isinstance(data["flags"], list) or not all(isinstance(flag, str) for flag in data["flags"]):
            raise fail(f"flags must be a list of strings, got {data['flags']!r}")
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
class SequentialFigures:
    """A sequential run's summary figures: grid, accuracy certified on it (from radius 0), draws per image."""

    radii: list[float]
    n_max: int
    grid_certified_accuracy: list[RadiusPoint]
    draws_per_image: dict[str, float]
    method: str = "sequential"

    KEYS: ClassVar[tuple[str, ...]] = ("method", "radii", "n_max", "grid_certified_accuracy", "draws_per_image")

    def to_json(self) -> dict[str, Any]:
        return {key: _plain(getattr(self, key)) for key in self.KEYS}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SequentialFigures:
        require(data, "sequential certify", cls.KEYS)
        check_count("n_max", data["n_max"])
        points = check_points(data, "grid_certified_accuracy", ("radius", "accuracy"))
        for i, point in enumerate(points):
            check_fraction(f"grid_certified_accuracy[{i}].accuracy", point["accuracy"])
        draws = data["draws_per_image"]
        if not isinstance(draws, dict) or any(k not in draws for k in ("mean", "median", "max")):
            raise fail(f"draws_per_image must be an object with mean, median and max, got {draws!r}")
        return cls([float(r) for r in data["radii"]], data["n_max"],
                   [RadiusPoint(float(p["radius"]), float(p["accuracy"])) for p in points], dict(draws))


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
    # certify: base-classifier evaluations in all (n0 + n per image for CERTIFY; None in older summaries).
    forward_passes: int | None = None
    sequential: SequentialFigures | None = None  # the sequential method's figures

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
        order = self._ORDER[self.kind]
        cut = order.index("seconds") + 1
        added = {**(self.sequential.to_json() if self.sequential is not None else {}),
                 **({} if self.forward_passes is None else {"forward_passes": self.forward_passes})}
        return {**{key: _plain(getattr(self, key)) for key in order[:cut]}, **added,
                **{key: _plain(getattr(self, key)) for key in order[cut:]}, **self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SmoothingSummary:
        kind = data.get("kind")
        if kind not in cls.REQUIRED:
            raise fail(f"summary.json has kind {kind!r}; expected certify or predict")
        require(data, kind, cls.REQUIRED[kind])
        for key in ("n0", "n", "n_images") if kind == "certify" else ("n", "n_images"):
            check_count(key, data[key])
        curve = None
        if kind == "certify":
            points = check_points(data, "certified_accuracy", ("radius", "accuracy"))
            for i, point in enumerate(points):
                check_fraction(f"certified_accuracy[{i}].accuracy", point["accuracy"])
            curve = [RadiusPoint(float(p["radius"]), float(p["accuracy"])) for p in points]
        check_fraction("abstain_rate", data["abstain_rate"])
        if float(data["sigma"]) <= 0:
            raise fail(f"sigma must be positive, got {data['sigma']!r}")
        sequential = SequentialFigures.from_json(data) if data.get("method") == "sequential" else None
        known = {*cls._ORDER[kind], "forward_passes", *(SequentialFigures.KEYS if sequential else ())}
        return cls(kind=kind, model=data["model"], dataset=data["dataset"], mode=data["mode"], sigma=data["sigma"],
                   n=data["n"], alpha=data["alpha"], n_images=data["n_images"], abstain_rate=data["abstain_rate"],
                   seconds=data.get("seconds"), n0=data.get("n0"), certified_accuracy=curve, acr=data.get("acr"),
                   accuracy=data.get("accuracy"), skip=data.get("skip"), seed=data.get("seed"),
                   extra={k: v for k, v in data.items() if k not in known},
                   forward_passes=data.get("forward_passes"), sequential=sequential)


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
        require(data, "denoise", ("model", "dataset", "n_images", "psnr"))
        points = check_points(data, "psnr", ("sigma", "psnr", "psnr_noisy"))
        check_count("n_images", data["n_images"])
        return cls(data["model"], data["dataset"], data["n_images"],
                   [PsnrPoint(float(p["sigma"]), float(p["psnr"]), float(p["psnr_noisy"])) for p in points],
                   seed=data.get("seed"), seconds=data.get("seconds"))


Summary = AttackSummary | SmoothingSummary | DenoiseSummary


def summary_from_json(data: Any, kinds: tuple[str, ...] = RUN_KINDS) -> Summary:
    """Parse and validate a summary.json of one of `kinds`; RecordFormatError says what breaks the contract."""
    if not isinstance(data, dict):
        raise fail(f"summary.json must hold a JSON object, got {type(data).__name__}")
    kind = data.get("kind")
    if kind not in kinds:
        raise fail(f"summary.json has kind {kind!r}; expected one of {', '.join(kinds)}")
    if kind == "attack":
        return AttackSummary.from_json(data)
    if kind == "denoise":
        return DenoiseSummary.from_json(data)
    return SmoothingSummary.from_json(data)
