"""The regression gate: compare runs with a committed baseline, fail only on significant drops.

For every figure that is a proportion — clean accuracy and robust accuracy at
each ε of an attack run, certified accuracy at each radius of a certify run —
a one-sided test asks whether the current accuracy is lower than the
baseline's: Fisher's exact test on the 2×2 table (correct, wrong) × (current,
baseline), `alternative="less"` (scipy). It is exact at every n, also when a
figure is 0% or 100%, and conservative, so noise alone fails the gate with
probability at most α per figure.

Outcomes (`CheckResult.exit_code`):
- 0: every baseline entry has a run with the same configuration and no figure
  dropped significantly;
- 1: some figure dropped significantly at α (each regression is listed with
  both figures and its p-value);
- 2: the comparison is not possible: a baseline entry without a run, a run
  without a baseline entry, two runs for one entry, or a changed
  configuration (n, ε list, σ, n0/n/α, gradient, EOT). These are errors, not passes.

Baseline file (JSON, written by `write_baseline`, rewritten atomically by
`robusteval check --update`)::

    {
      "format": "robusteval-baseline/1",
      "updated": "2025-01-01T00:00:00+00:00",
      "entries": {
        "attack/digits/standard/Linf/autoattack/none": {
          "kind": "attack",
          "identity": {"dataset": "digits", "model": "standard", "norm": "Linf",
                       "attack": "autoattack", "defense": "none"},
          "config": {"n": 100, "eps": [0.05, 0.1], "gradient": null, "eot": null},
          "figures": {"clean_accuracy": {"correct": 97, "total": 100},
                      "robust_accuracy@eps=0.1": {"correct": 20, "total": 100}},
          "run": "runs/standard-autoattack-..."
        },
        "certify/digits/gaussian/direct/sigma=0.25": {
          "kind": "certify",
          "identity": {"dataset": "digits", "model": "gaussian", "mode": "direct", "sigma": 0.25},
          "config": {"n_images": 100, "n0": 100, "n": 1000, "alpha": 0.001},
          "figures": {"certified_accuracy@r=0": {"correct": 90, "total": 100}, ...},
          "run": "runs/..."
        }
      }
    }

Figures are stored as counts (correct out of total): the test needs them, and
they are what the run measured. Denoise runs are not gated.

`robust_accuracy@eps` is the attack's own figure (`standard_robust_accuracy`
of the curve: AutoAttack's own for --attack autoattack), as it has always
been: baselines written before the engine ran remedy stages hold that figure,
so the gate compares like with like. Summaries without the field (older
runs) give their `robust_accuracy`, which was the attack's own then. The
worst case over the remedy stages is reported, not gated.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scipy.stats import fisher_exact

from robusteval.core.atomic_files import atomic_write_json
from robusteval.core.errors import MissingFileError, UsageError
from robusteval.reports.loading import Run
from robusteval.reports.tables import format_number

logger = logging.getLogger(__name__)

BASELINE_FORMAT = "robusteval-baseline/1"


class BaselineError(UsageError):
    """A baseline file that cannot be read or does not follow the format."""


@dataclass(frozen=True)
class Count:
    """A proportion as it was measured: `correct` out of `total`."""

    correct: int
    total: int

    @property
    def fraction(self) -> float:
        return self.correct / self.total

    def __str__(self) -> str:
        return f"{100 * self.fraction:.1f}% ({self.correct}/{self.total})"


@dataclass(frozen=True)
class Entry:
    """What the gate compares for one run: identity, configuration and figures."""

    key: str
    kind: str
    identity: dict[str, Any]
    config: dict[str, Any]
    figures: dict[str, Count]
    run: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "identity": self.identity, "config": self.config,
            "figures": {name: {"correct": c.correct, "total": c.total} for name, c in self.figures.items()},
            "run": self.run,
        }

    @property
    def family(self) -> str:
        """The identity without σ: entries of one family that differ in σ are a changed configuration."""
        return "/".join(str(v) for k, v in self.identity.items() if k != "sigma")


def _count(fraction: float, total: int, where: str) -> Count:
    correct = round(float(fraction) * total)
    if abs(correct / total - float(fraction)) > 1e-6:
        raise ValueError(f"{where}: {fraction} is not a count out of {total}")
    return Count(correct, total)


def entry_from_run(run: Run) -> Entry | None:
    """The gate's view of a run (None for kinds that are not gated)."""
    summary = run.summary
    where = str(run.path)
    if run.kind == "attack":
        n = int(summary["n"])
        identity = {"dataset": run.dataset, "model": run.model, "norm": summary["norm"],
                    "attack": summary["attack"], "defense": run.defense}
        curve = sorted(summary["curve"], key=lambda p: float(p["eps"]))
        config = {"n": n, "eps": [float(p["eps"]) for p in curve], "gradient": summary.get("gradient"),
                  "eot": summary.get("eot")}
        figures = {"clean_accuracy": _count(summary["clean_accuracy"], n, where)}
        for point in curve:
            own = point.get("standard_robust_accuracy")
            figures[f"robust_accuracy@eps={format_number(float(point['eps']))}"] = _count(
                point["robust_accuracy"] if own is None else own, n, where)
    elif run.kind == "certify":
        n_images = int(summary["n_images"])
        identity = {"dataset": run.dataset, "model": run.model, "mode": summary["mode"],
                    "sigma": float(summary["sigma"])}
        config = {"n_images": n_images, "n0": int(summary["n0"]), "n": int(summary["n"]),
                  "alpha": float(summary["alpha"])}
        if summary.get("method") == "sequential":
            # Another evaluation than CERTIFY's (its n is the budget n_max): its own entry, gated on its own.
            identity["method"] = "sequential"
            config["radii"] = list(summary["radii"])
        figures = {
            f"certified_accuracy@r={format_number(float(p['radius']))}": _count(p["accuracy"], n_images, where)
            for p in sorted(summary["certified_accuracy"], key=lambda p: float(p["radius"]))
        }
    else:
        return None
    return Entry(entry_key(run.kind, identity), run.kind, identity, config, figures, str(run.path))


def entry_key(kind: str, identity: dict[str, Any]) -> str:
    """The baseline key of an entry: its kind and identity's values, in order (σ as `sigma=<σ>`)."""
    return "/".join([kind, *(f"sigma={format_number(float(v))}" if k == "sigma" else str(v)
                             for k, v in identity.items())])


def entries_from_runs(runs: Sequence[Run]) -> dict[str, Entry]:
    """Entries by key; two runs for one entry are an error (which one would the gate trust?)."""
    entries: dict[str, Entry] = {}
    for run in runs:
        entry = entry_from_run(run)
        if entry is None:
            logger.info("%s: %s runs are not gated", run.path, run.kind)
            continue
        if entry.key in entries:
            raise UsageError(f"two runs for the same entry {entry.key}: {entries[entry.key].run} and {entry.run}; "
                             f"pass one of them")
        entries[entry.key] = entry
    return entries


def write_baseline(runs: Sequence[Run], path: str | Path) -> dict[str, Entry]:
    """Write the baseline for these runs, atomically; returns its entries."""
    entries = entries_from_runs(runs)
    if not entries:
        raise UsageError("no attack or certify runs to make a baseline from")
    document = {
        "format": BASELINE_FORMAT,
        "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "entries": {key: entries[key].as_dict() for key in sorted(entries)},
    }
    atomic_write_json(path, document)
    return entries


def load_baseline(path: str | Path) -> dict[str, Entry]:
    """Read a baseline file written by `write_baseline`."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"baseline {path} does not exist; create it with `robusteval check RUNS... "
                                f"--baseline {path} --update`")
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BaselineError(f"baseline {path} is not valid JSON: {error}") from error
    if not isinstance(document, dict) or document.get("format") != BASELINE_FORMAT:
        raise BaselineError(f"baseline {path} is not a {BASELINE_FORMAT} file (format: "
                            f"{document.get('format') if isinstance(document, dict) else None!r})")
    raw_entries = document.get("entries")
    if not isinstance(raw_entries, dict) or not raw_entries:
        raise BaselineError(f"baseline {path} has no entries (expected an object of entries; rewrite it with "
                            f"--update)")
    return {key: _entry(path, key, raw) for key, raw in raw_entries.items()}


def _entry(path: Path, key: str, raw: Any) -> Entry:
    """One baseline entry, its structure checked; a malformed one is a BaselineError naming the entry."""
    def malformed(problem: str) -> BaselineError:
        return BaselineError(f"baseline {path}: entry {key!r} {problem}; fix the entry or rewrite the baseline "
                             f"with --update")

    if not isinstance(raw, dict):
        raise malformed(f"is a JSON {type(raw).__name__}, not an object")
    kind, identity, config, figures = (raw.get(k) for k in ("kind", "identity", "config", "figures"))
    if kind not in ("attack", "certify"):
        raise malformed(f"has kind {kind!r} (expected 'attack' or 'certify')")
    if not isinstance(identity, dict) or not identity or not isinstance(config, dict):
        raise malformed("lacks its identity or config object")
    expected = entry_key(kind, identity) if all(k != "sigma" or isinstance(v, (int, float))
                                                for k, v in identity.items()) else None
    if expected != key:
        raise malformed(f"does not match its identity {identity} (the key of that identity is {expected!r})")
    if not isinstance(figures, dict) or not figures:
        raise malformed("has no figures (nothing of it would be compared)")
    return Entry(key, kind, dict(identity), dict(config),
                 {name: _figure(name, count, malformed) for name, count in figures.items()}, str(raw.get("run", "")))


def _figure(name: str, count: Any, malformed: Any) -> Count:
    """A figure's count: integers 0 <= correct <= total, total > 0."""
    if not isinstance(count, dict):
        raise malformed(f"figure {name!r} is not an object with correct and total")
    correct, total = count.get("correct"), count.get("total")
    if any(not isinstance(v, int) or isinstance(v, bool) for v in (correct, total)):
        raise malformed(f"figure {name!r} has correct {correct!r} and total {total!r} (expected integer counts)")
    if total <= 0 or not 0 <= correct <= total:
        raise malformed(f"figure {name!r} is {correct}/{total} (expected 0 <= correct <= total and total > 0)")
    return Count(correct, total)


def p_value_lower(current: Count, baseline: Count) -> float:
    """One-sided p-value of 'the current accuracy is lower than the baseline's' (Fisher's exact test)."""
    table = [[current.correct, current.total - current.correct], [baseline.correct, baseline.total - baseline.correct]]
    return float(fisher_exact(table, alternative="less").pvalue)


@dataclass(frozen=True)
class Regression:
    """A figure that dropped significantly."""

    entry: str
    figure: str
    baseline: Count
    current: Count
    p_value: float


@dataclass
class CheckResult:
    """What the gate found."""

    alpha: float
    regressions: list[Regression] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    compared: int = 0
    entries: int = 0

    @property
    def exit_code(self) -> int:
        if self.errors:
            return 2
        return 1 if self.regressions else 0


def _config_changes(baseline: Entry, current: Entry) -> list[str]:
    changes = []
    for key in sorted(set(baseline.config) | set(current.config)):
        old, new = baseline.config.get(key), current.config.get(key)
        if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
            if all(abs(float(a) - float(b)) <= 1e-9 for a, b in zip(old, new)):
                continue
        elif old == new:
            continue
        changes.append(f"{key} {old} → {new}")
    return changes


def compare(current: dict[str, Entry], baseline: dict[str, Entry], alpha: float = 0.05) -> CheckResult:
    """Compare entries with the baseline at level `alpha` (see the module docstring for the outcomes)."""
    if not 0.0 < alpha < 1.0:
        raise UsageError(f"alpha must be in (0, 1), got {alpha}")
    result = CheckResult(alpha=alpha)
    missing = {k: baseline[k] for k in baseline if k not in current}
    extra = {k: current[k] for k in current if k not in baseline}
    # Entries that differ only in σ: a changed configuration, said as such.
    for key, old in list(missing.items()):
        partner = next((k for k, new in extra.items() if new.family == old.family), None)
        if partner is not None:
            new = extra.pop(partner)
            del missing[key]
            result.errors.append(f"{key}: configuration changed: sigma {old.identity.get('sigma')} → "
                                 f"{new.identity.get('sigma')} (run {new.run})")
    for key in sorted(missing):
        result.errors.append(f"{key}: in the baseline but no run was given for it (baseline run {missing[key].run})")
    for key in sorted(extra):
        result.errors.append(f"{key}: no baseline entry for run {extra[key].run} "
                             f"(add it with --update if it is new)")
    for key in sorted(set(current) & set(baseline)):
        old, new = baseline[key], current[key]
        changes = _config_changes(old, new)
        if changes:
            result.errors.append(f"{key}: configuration changed: {'; '.join(changes)} (run {new.run})")
            continue
        result.entries += 1
        for name, before in old.figures.items():
            after = new.figures.get(name)
            if after is None:
                if name.startswith("certified_accuracy@"):
                    # The radius grid stops at the largest radius reached: beyond it nothing is certified.
                    after = Count(0, before.total)
                else:
                    result.errors.append(f"{key}: the run has no figure {name}")
                    continue
            result.compared += 1
            p_value = p_value_lower(after, before)
            if p_value < alpha:
                result.regressions.append(Regression(key, name, before, after, p_value))
    return result


def format_result(result: CheckResult) -> str:
    """The gate's report as text: errors, then a table of regressions, then a one-line verdict."""
    lines = []
    if result.errors:
        lines.append(f"{len(result.errors)} error(s): the comparison is incomplete")
        lines.extend(f"  error: {e}" for e in result.errors)
    if result.regressions:
        rows = [(r.entry, r.figure, str(r.baseline), str(r.current),
                 f"{100 * (r.current.fraction - r.baseline.fraction):+.1f}", f"{r.p_value:.2g}")
                for r in result.regressions]
        header = ("entry", "figure", "baseline", "current", "change (pts)", "p-value")
        widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
        lines.append(f"{len(result.regressions)} significant regression(s) (one-sided Fisher exact test, "
                     f"α = {result.alpha:g}):")
        for row in (header, tuple("-" * w for w in widths), *rows):
            lines.append("  " + "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
    verdict = {0: "ok", 1: "FAILED: significant regressions", 2: "ERROR: cannot compare"}[result.exit_code]
    lines.append(f"{verdict}: {result.compared} figures in {result.entries} entries compared at α = {result.alpha:g}")
    return "\n".join(lines)
