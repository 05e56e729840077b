"""What an attack run returns: the figures of summary.json, computed from the per-point records."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from robusteval.attacks import sanity
from robusteval.records import AttackSummary, CurvePoint


@dataclass
class AttackResult(AttackSummary):
    """The figures of summary.json, plus the per-point records and adversarial examples.

    `curve[i].robust_accuracy` is the fraction of all n points that are
    correctly classified and not broken at `curve[i].eps` by anything the
    engine ran (the attack, its remedies and escalations), with a 95%
    Clopper–Pearson interval; `curve[i].standard_robust_accuracy` counts
    only the attack's own components (AutoAttack's own figure);
    `curve[i].worst_of_n_robust_accuracy` (randomized pipelines) also
    counts a point as broken when any fresh decision draw is fooled.
    """

    run_dir: Path | None = field(default=None, compare=False)
    records: list[dict[str, Any]] = field(default_factory=list, repr=False, compare=False)
    adversarial: dict[float, Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def eps(self) -> list[float]:
        return [p.eps for p in self.curve]

    def robust_accuracy(self, eps: float) -> float:
        for point in self.curve:
            if math.isclose(point.eps, eps, rel_tol=0, abs_tol=1e-12):
                return point.robust_accuracy
        raise KeyError(f"eps {eps} is not on the curve (have {self.eps})")

    @classmethod
    def of_run(cls, config: Mapping[str, Any], records: list[dict[str, Any]], checks: Sequence[sanity.Check],
               large_eps: dict[str, Any] | None, notes: list[str], seconds: float) -> AttackResult:
        """The figures of a run with configuration `config` (its config.json) from all its records, the checks
        that ran on it, the large-ε check's result and the run's notes and seconds."""
        eps = list(config["eps"])
        return cls(
            model=config["model"], dataset=config["dataset"], n=len(records), attack=config["attack"],
            norm=config["norm"], defense=config["defense"],
            clean_accuracy=sum(1 for r in records if r["correct"]) / len(records),
            curve=robustness_curve(records, eps), flags=sanity.flags_of(checks), seconds=seconds,
            gradient=config["gradient"], eot=config["eot"], seed=config["seed"], batch_size=config["batch_size"],
            checks=[c.as_dict() for c in checks], large_eps=large_eps, notes=notes,
        )

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> AttackResult:
        """Rebuild a result from a summary.json (records and adversarial examples are not in it)."""
        parsed = AttackSummary.from_json(summary)
        return cls(**{f.name: getattr(parsed, f.name) for f in dataclasses.fields(AttackSummary)})

    def summary(self) -> dict[str, Any]:
        """Exactly what summary.json holds."""
        return self.to_json()


def robustness_curve(records: list[dict[str, Any]], eps: list[float]) -> list[CurvePoint]:
    """Robust accuracy at each ε over all records, its 95% Clopper–Pearson interval, and who broke the points.

    Besides the worst case over every stage: the attack's own figure (records without `standard_broken`
    predate the remedy stages: there it is `broken`), and worst-of-N when the records carry `worst_broken`.
    """
    # deferred: statsmodels costs ~0.8 s to import
    from statsmodels.stats.proportion import proportion_confint

    n = len(records)
    correct = [r for r in records if r["correct"]]
    curve = []
    for e, value in enumerate(eps):
        outcomes = [r["results"][e] for r in correct]
        robust = sum(1 for o in outcomes if not o["broken"])
        standard = sum(1 for o in outcomes if not _standard_broken(o))
        low, high = proportion_confint(robust, n, alpha=0.05, method="beta")
        broken_by = Counter(o["attack"] for o in outcomes if o["broken"])
        rejected = sum(r["results"][e]["rejected"] for r in records)
        worst = None
        if any(o.get("worst_broken") is not None for o in outcomes):
            worst = sum(1 for o in outcomes if not (o["broken"] or o.get("worst_broken")))
        curve.append(CurvePoint(value, robust / n, float(low), float(high), dict(sorted(broken_by.items())),
                                robust=robust, rejected=rejected, standard_robust_accuracy=standard / n,
                                standard_robust=standard,
                                worst_of_n_robust_accuracy=None if worst is None else worst / n,
                                worst_of_n_robust=worst))
    return curve


def _standard_broken(outcome: dict[str, Any]) -> bool:
    standard = outcome.get("standard_broken")
    return bool(outcome["broken"] if standard is None else standard)
