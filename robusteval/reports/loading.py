"""Loading finished run directories for reports and checks, with validation.

A run directory (see `robusteval.runs`) is the single source of truth. This
module reads one, checks that its summary has the keys and value ranges its
kind promises, and returns a `Run`. Anything that is not a finished run of a
known kind is a `RunFormatError` that names the directory and what is wrong.

Kinds and their summary.json keys:

- ``attack``  (written by `robusteval run`): model, dataset, n, attack, norm,
  defense, clean_accuracy, curve [{eps, robust_accuracy, ci_low, ci_high,
  broken_by}], flags, seconds; optionally gradient, eot, seed.
- ``certify`` (written by `robusteval certify`): model, dataset, mode, sigma,
  n0, n, alpha, n_images, certified_accuracy [{radius, accuracy}], acr,
  abstain_rate, seconds.
- ``denoise`` (written by `robusteval.denoising.evaluate_denoising`): model,
  dataset, n_images, psnr [{sigma, psnr, psnr_noisy}], seconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robusteval.runs import CONFIG_FILE, PROVENANCE_KEY, SUMMARY_FILE, RunFileDamaged, read_run

KINDS = ("attack", "certify", "denoise")

_REQUIRED: dict[str, tuple[str, ...]] = {
    "attack": ("model", "dataset", "n", "attack", "norm", "defense", "clean_accuracy", "curve", "flags"),
    "certify": ("model", "dataset", "mode", "sigma", "n0", "n", "alpha", "n_images", "certified_accuracy", "acr",
                "abstain_rate"),
    "denoise": ("model", "dataset", "n_images", "psnr"),
}
_CURVE_KEYS = {
    "attack": ("curve", ("eps", "robust_accuracy", "ci_low", "ci_high")),
    "certify": ("certified_accuracy", ("radius", "accuracy")),
    "denoise": ("psnr", ("sigma", "psnr", "psnr_noisy")),
}
NORMS = ("Linf", "L2")


class RunFormatError(ValueError):
    """A path that is not a finished run of a known kind, or whose summary breaks the contract."""


@dataclass(frozen=True)
class Run:
    """One finished run: where it is, its kind, summary, configuration and per-image records."""

    path: Path
    kind: str
    summary: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def model(self) -> str:
        return str(self.summary["model"])

    @property
    def dataset(self) -> str:
        return str(self.summary["dataset"])

    @property
    def provenance(self) -> dict[str, Any]:
        """Versions, git commit, command and time recorded when the run started (empty if absent)."""
        value = self.config.get(PROVENANCE_KEY, {})
        return value if isinstance(value, dict) else {}

    @property
    def seed(self) -> Any:
        return self.summary.get("seed", self.config.get("seed"))

    # --- attack runs ----------------------------------------------------------------
    @property
    def defense(self) -> str:
        """The attacked pipeline ('none' when the model's logits are attacked directly)."""
        return str(self.summary.get("defense") or "none")

    @property
    def system(self) -> str:
        """What was evaluated: the model, plus its defense when there is one."""
        if self.kind != "attack" or self.defense == "none":
            return self.model
        return f"{self.model} + {self.defense}"

    @property
    def attack_label(self) -> str:
        """The attack with the settings that make it a different attack (gradient, EOT)."""
        parts = [str(self.summary["attack"])]
        gradient = self.summary.get("gradient")
        if gradient and self.defense != "none":  # the gradient only differs for a defended pipeline
            parts.append(f"{gradient} gradient")
        eot = self.summary.get("eot")
        if eot not in (None, 0, 1):
            parts.append(f"EOT {eot}")
        return parts[0] if len(parts) == 1 else f"{parts[0]} ({', '.join(parts[1:])})"

    @property
    def flags(self) -> list[str]:
        """Sanity-check flags as readable strings (the engine may write strings or objects)."""
        return [flag_text(flag) for flag in self.summary.get("flags") or []]

    def robust_accuracy_at(self, eps: float) -> dict[str, Any] | None:
        """The curve point at `eps` (matched to 1e-9), or None when the run did not evaluate it."""
        for point in self.summary.get("curve", []):
            if same_number(point["eps"], eps):
                return point
        return None

    # --- certify runs ---------------------------------------------------------------
    def certified_accuracy_at(self, radius: float) -> float:
        """Certified accuracy at an L2 radius.

        Read from the summary's grid; beyond its last radius no point is
        certified (the grid stops at the largest radius reached), so 0. Off the
        grid, it is counted from the per-image records.
        """
        points = self.summary["certified_accuracy"]
        for point in points:
            if same_number(point["radius"], radius):
                return float(point["accuracy"])
        if not points or radius > max(float(p["radius"]) for p in points):
            return 0.0
        counted = certified_accuracy_from_records(self, [radius])
        if counted is None:
            raise RunFormatError(
                f"{self.path}: certified accuracy at radius {radius:g} is off the summary's grid and the "
                f"per-image records (radius, correct) are missing"
            )
        return counted[0]


def flag_text(flag: Any) -> str:
    """A flag as one line: a string as is; an object by its message/name (and ε when it has one)."""
    if isinstance(flag, str):
        return flag
    if isinstance(flag, dict):
        text = next((str(flag[k]) for k in ("message", "text", "name", "code", "check") if flag.get(k)), None)
        if text is None:
            text = json.dumps(flag, sort_keys=True)
        if "eps" in flag and "ε" not in text and "eps" not in text:
            text += f" (ε = {flag['eps']})"
        return text
    return str(flag)


def flag_eps(flag: Any) -> float | None:
    """The ε a flag refers to, when it names one (flags about the whole run return None)."""
    if isinstance(flag, dict) and isinstance(flag.get("eps"), (int, float)):
        return float(flag["eps"])
    return None


def same_number(a: Any, b: Any, tolerance: float = 1e-9) -> bool:
    """Equality of two budgets/radii/noise levels read from JSON."""
    return math.isclose(float(a), float(b), rel_tol=tolerance, abs_tol=tolerance)


def certified_accuracy_from_records(run: Run, radii: Iterable[float]) -> list[float] | None:
    """Certified accuracy at each radius counted from per-image records, or None without usable records.

    A record counts at radius r when it is correct and its certified radius is at least r.
    """
    records = run.records
    n_images = int(run.summary["n_images"])
    if len(records) != n_images or not all("radius" in r and "correct" in r for r in records):
        return None
    certified = [float(r["radius"]) if r["correct"] and r["radius"] is not None else -1.0 for r in records]
    return [sum(1 for value in certified if value >= radius - 1e-12) / n_images for radius in radii]


def _fail(path: Path, message: str) -> RunFormatError:
    return RunFormatError(f"{path}: {message}")


def _check_fraction(path: Path, where: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
        raise _fail(path, f"{where} must be a fraction in [0, 1], got {value!r}")


def _check_count(path: Path, key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _fail(path, f"{key} must be a positive integer, got {value!r}")


def validate_summary(path: Path, summary: Any) -> str:
    """Check a summary against its kind's contract; returns the kind."""
    if not isinstance(summary, dict):
        raise _fail(path, f"{SUMMARY_FILE} must hold a JSON object, got {type(summary).__name__}")
    kind = summary.get("kind")
    if kind not in KINDS:
        raise _fail(path, f"{SUMMARY_FILE} has kind {kind!r}; expected one of {', '.join(KINDS)}")
    missing = [key for key in _REQUIRED[kind] if key not in summary]
    if missing:
        raise _fail(path, f"{SUMMARY_FILE} of a {kind} run lacks {', '.join(missing)}")
    list_key, point_keys = _CURVE_KEYS[kind]
    points = summary[list_key]
    if not isinstance(points, list) or not points:
        raise _fail(path, f"{list_key} must be a non-empty list")
    for i, point in enumerate(points):
        if not isinstance(point, dict) or any(k not in point for k in point_keys):
            raise _fail(path, f"{list_key}[{i}] must be an object with {', '.join(point_keys)}")
        if any(not isinstance(point[k], (int, float)) or isinstance(point[k], bool) for k in point_keys):
            raise _fail(path, f"{list_key}[{i}] has a non-numeric value: {point}")
    if kind == "attack":
        _check_count(path, "n", summary["n"])
        if summary["norm"] not in NORMS:
            raise _fail(path, f"norm must be one of {', '.join(NORMS)}, got {summary['norm']!r}")
        _check_fraction(path, "clean_accuracy", summary["clean_accuracy"])
        for i, point in enumerate(points):
            for key in ("robust_accuracy", "ci_low", "ci_high"):
                _check_fraction(path, f"curve[{i}].{key}", point[key])
            if not point["ci_low"] - 1e-9 <= point["robust_accuracy"] <= point["ci_high"] + 1e-9:
                raise _fail(path, f"curve[{i}]: robust accuracy {point['robust_accuracy']} lies outside its "
                                  f"interval [{point['ci_low']}, {point['ci_high']}]")
        if not isinstance(summary["flags"], list):
            raise _fail(path, f"flags must be a list, got {type(summary['flags']).__name__}")
    elif kind == "certify":
        for key in ("n0", "n", "n_images"):
            _check_count(path, key, summary[key])
        for i, point in enumerate(points):
            _check_fraction(path, f"certified_accuracy[{i}].accuracy", point["accuracy"])
        _check_fraction(path, "abstain_rate", summary["abstain_rate"])
        if float(summary["sigma"]) <= 0:
            raise _fail(path, f"sigma must be positive, got {summary['sigma']!r}")
    else:
        _check_count(path, "n_images", summary["n_images"])
    return kind


def _is_run_dir(path: Path) -> bool:
    return (path / SUMMARY_FILE).exists() or (path / CONFIG_FILE).exists()


def load_run(path: str | Path) -> Run:
    """Load and validate one finished run directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected a run directory (config.json, summary.json)")
    if not path.is_dir():
        raise RunFormatError(f"{path} is not a directory; expected a run directory (config.json, summary.json)")
    if not (path / SUMMARY_FILE).is_file():
        hint = (" (it has a config.json: the run was interrupted or is still going; re-run its command to resume)"
                if (path / CONFIG_FILE).exists() else "")
        raise RunFormatError(f"{path} is not a finished run: {SUMMARY_FILE} is missing{hint}")
    try:
        loaded = read_run(path)
    except RunFileDamaged as error:  # names the file and what to do
        raise RunFormatError(str(error)) from error
    kind = validate_summary(path, loaded["summary"])
    return Run(path=path, kind=kind, summary=loaded["summary"], config=loaded["config"], records=loaded["records"])


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Load runs from run directories, or from folders whose sub-directories are runs (e.g. `runs/`).

    Paths are de-duplicated; the result is in a stable order (kind, dataset, model, path).
    """
    runs: dict[Path, Run] = {}
    given = [Path(p) for p in paths]
    if not given:
        raise ValueError("no run directories given")
    for path in given:
        if path.is_dir() and not _is_run_dir(path):
            children = sorted(child for child in path.iterdir() if child.is_dir() and _is_run_dir(child))
            if not children:
                raise RunFormatError(f"{path} is neither a run directory nor a folder of run directories")
            for child in children:
                runs.setdefault(child.resolve(), load_run(child))
        else:
            runs.setdefault(path.resolve(), load_run(path))
    return sorted(runs.values(), key=lambda r: (r.kind, r.dataset, r.model, str(r.path)))
