"""Loading finished run directories for reports and checks, with validation.

A run directory (see `robusteval.runs`) is the single source of truth. This
module reads one, checks that its summary has the keys and value ranges its
kind promises, and returns a `Run`. Anything that is not a finished run of a
known kind is a `RunFormatError` that names the directory and what is wrong.

The kinds and their summary.json keys are the records of `robusteval.records`;
this module adds where a run lives and the figures reports read from it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robusteval.attacks.remedies import recorded_attack_labels
from robusteval.core.errors import MissingFileError, UsageError
from robusteval.core.fingerprints import short
from robusteval.core.names import UnknownNameError
from robusteval.core.vocabulary import RUN_KINDS
from robusteval.records import RecordFormatError, Summary, summary_from_json
from robusteval.records.consistency import check_records
from robusteval.runs import (
    CONFIG_FILE,
    PROVENANCE_KEY,
    SAMPLES_FILE,
    SUMMARY_FILE,
    RunFileDamaged,
    read_run,
)

# The kinds a report shows (predict runs have no figure of their own).
KINDS = tuple(kind for kind in RUN_KINDS if kind != "predict")


class RunFormatError(UsageError):
    """A path that is not a finished run of a known kind, or whose summary breaks the contract."""


@dataclass(frozen=True)
class Run:
    """One finished run: where it is, its kind, summary, configuration and per-image records."""

    path: Path
    kind: str
    summary: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    # The typed, validated form of `summary` (robusteval.records); None for a Run built by hand.
    record: Summary | None = field(default=None, compare=False, repr=False)

    @property
    def model(self) -> str:
        return str(self.summary["model"])

    @property
    def dataset(self) -> str:
        return str(self.summary["dataset"])

    @property
    def smoothing_mode(self) -> str:
        """A certify run's mode, with ", sequential" for the sequential method (its curves are not CERTIFY's)."""
        mode = str(self.summary["mode"])
        return f"{mode}, sequential" if self.summary.get("method") == "sequential" else mode

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
        """The sanity-check flags the engine raised, one line each."""
        return list(self.summary.get("flags") or [])

    @property
    def cleared(self) -> list[str]:
        """Checks that would have flagged and that an adaptive stage cleared (remedies, escalation), one line each."""
        return [f"{c['check']}: {c['message']}" for c in self.summary.get("checks") or []
                if c.get("status") == "pass" and ("; cleared:" in c["message"] or "after escalating" in c["message"])]

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


def validate_summary(path: Path, summary: Any) -> str:
    """Check a summary against its kind's contract (robusteval.records); returns the kind."""
    return parse_summary(path, summary).kind


def parse_summary(path: Path, summary: Any) -> Summary:
    """The typed summary record of a run directory; RunFormatError names the directory and what is wrong."""
    try:
        return summary_from_json(summary, KINDS)
    except RecordFormatError as error:
        raise RunFormatError(f"{path}: {error}") from None


def check_run_records(path: Path, kind: str, config: dict[str, Any], summary: dict[str, Any],
                      records: list[dict[str, Any]]) -> None:
    """Every record checked against itself and its run (robusteval.records.consistency); the first that
    contradicts itself is a RecordInconsistent naming samples.jsonl, the line and the field.

    The data set's labels are not read here (reports run where the data may not be): resume checks them.
    Older configurations lack keys the summary holds (σ, n, the ε list), so those come from the summary.
    """
    known = {k: summary[k] for k in ("sigma", "n", "method", "radii", "n_max") if k in summary}
    if kind == "attack" and "curve" in summary:
        known["eps"] = [point["eps"] for point in summary["curve"]]
    checked = {**known, **{k: v for k, v in config.items() if k != PROVENANCE_KEY}}
    attack_labels = None
    if kind == "attack":
        try:
            attack_labels = recorded_attack_labels(str(checked.get("attack", summary.get("attack"))),
                                                   checked.get("gradient", summary.get("gradient")),
                                                   str(checked.get("defense", summary.get("defense", "none"))))
        except UnknownNameError:  # an attack this version does not know: its names cannot be checked
            attack_labels = None
    check_records(path / SAMPLES_FILE, kind, checked, records, attack_labels=attack_labels,
                  remedy="re-run the run's command with --no-resume")


def _is_run_dir(path: Path) -> bool:
    return (path / SUMMARY_FILE).exists() or (path / CONFIG_FILE).exists()


def load_run(path: str | Path) -> Run:
    """Load and validate one finished run directory."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path} does not exist; expected a run directory (config.json, summary.json)")
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
    record = parse_summary(path, loaded["summary"])
    check_run_records(path, record.kind, loaded["config"], loaded["summary"], loaded["records"])
    return Run(path=path, kind=record.kind, summary=loaded["summary"], config=loaded["config"],
               records=loaded["records"], record=record)


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Load runs from run directories, or from folders whose sub-directories are runs (e.g. `runs/`).

    Paths are de-duplicated; the result is in a stable order (kind, dataset, model, path).
    """
    runs: dict[Path, Run] = {}
    given = [Path(p) for p in paths]
    if not given:
        raise UsageError("no run directories given")
    for path in given:
        if path.is_dir() and not _is_run_dir(path):
            children = sorted(child for child in path.iterdir() if child.is_dir() and _is_run_dir(child))
            if not children:
                raise RunFormatError(f"{path} is neither a run directory nor a folder of run directories")
            for child in children:
                runs.setdefault(child.resolve(), load_run(child))
        else:
            runs.setdefault(path.resolve(), load_run(path))
    return sorted(distinguish_weights(list(runs.values())), key=lambda r: (r.kind, r.dataset, r.model, str(r.path)))


def weights_of(run: Run) -> str | None:
    """The fingerprint of the weights a run evaluated (None for runs made before certify recorded it)."""
    value = run.config.get("model_fingerprint")
    return str(value) if value else None


def distinguish_weights(runs: list[Run]) -> list[Run]:
    """Runs of one model name and data set but different weights never share a row: where two such runs
    differ in their weights' fingerprint, each of them is shown as `<model>@<8 hex of its fingerprint>`
    (a run without a fingerprint, made before runs recorded one, as `<model>@unknown`). Runs of one model
    whose known fingerprints agree keep the plain name."""
    known: dict[tuple[str, str], set[str]] = {}
    for run in runs:
        if weights_of(run) is not None:
            known.setdefault((run.dataset, run.model), set()).add(str(weights_of(run)))
    out = []
    for run in runs:
        if len(known.get((run.dataset, run.model), ())) < 2:
            out.append(run)
            continue
        fingerprint = weights_of(run)
        label = f"{run.model}@{short(fingerprint) if fingerprint is not None else 'unknown'}"
        out.append(dataclasses.replace(run, summary={**run.summary, "model": label}))
    return out
