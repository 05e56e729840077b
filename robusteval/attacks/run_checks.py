"""The checks a finished attack run gets: AutoAttack's flags, zero gradients, Square vs white-box, large ε.

Their verdicts (`sanity.Check`) go to summary.json as `checks`, and the failed
ones as `flags`: reasons the robust accuracy may be an overestimate.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from robusteval.attacks import sanity
from robusteval.attacks.catalog import AttackSpec, seed_torch
from robusteval.attacks.progress import AttackProgress
from robusteval.attacks.seeds import CHECKS, LARGE_EPS_BATCH_OFFSET, derive_seed

if TYPE_CHECKING:
    from robusteval.attacks.batch import BatchAttacker
    from robusteval.attacks.engine import AttackJob

LARGE_EPS_SUBSET = 100
# AutoAttack's randomness / output-range / dynamic checks look at this many points (a qualitative property).
CHECK_POINTS = 64


@dataclass
class ModelChecks:
    """The checks that run the model again, on the run's first points: AutoAttack's flags (or the note that the
    masking checks are off) and the large-ε attack. A sharded run computes them in the shard holding batch 0."""

    leading: list[sanity.Check]
    large: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return {"leading": [c.as_dict() for c in self.leading], "large": self.large}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelChecks:
        return cls([sanity.Check(c["check"], c["status"], c["message"]) for c in data["leading"]], data["large"])


def run_checks(job: AttackJob, attacker: BatchAttacker, records: list[dict[str, Any]], notes: set[str],
               progress: bool = False, with_model: bool = True) -> tuple[list[sanity.Check], ModelChecks | None]:
    """Every check of a finished run, and the model's part of them (None when `with_model` is False)."""
    model = model_checks(job, attacker, notes, progress) if with_model else None
    return record_checks(CheckPlan.of(job), records, model), model


def model_checks(job: AttackJob, attacker: BatchAttacker, notes: set[str], progress: bool = False) -> ModelChecks:
    """The checks that attack or query the model again (each seeded on its own, so any process computes them)."""
    primary = attacker.primary
    first = slice(0, min(job.n, job.batch_size, CHECK_POINTS))
    seed_torch(derive_seed(job.seed, CHECKS), job.device)
    if job.masking_checks:
        leading = sanity.autoattack_checks(primary, job.x[first].to(job.device), job.y[first].to(job.device),
                                           randomized=primary.randomized, eot=job.eot,
                                           adaptive_denoise=job.defense.kind == "denoise")
    else:
        leading = sanity.masking_checks_disabled(primary.randomized, job.eot, job.variants)
    large = large_eps_result(job, attacker, notes, progress) if job.large_eps_check else None
    return ModelChecks(list(leading), large)


@dataclass(frozen=True)
class CheckPlan:
    """What the record-based checks need of a run: its configuration, not its model (merge has none)."""

    spec: AttackSpec
    variants: list[str]
    n: int
    eps: list[float]
    norm: str
    masking_checks: bool
    large_eps_check: bool

    @classmethod
    def of(cls, job: AttackJob) -> CheckPlan:
        return cls(job.spec, list(job.variants), job.n, list(job.eps), job.norm, job.masking_checks,
                   job.large_eps_check)


def record_checks(plan: CheckPlan, records: list[dict[str, Any]], model: ModelChecks | None) -> list[sanity.Check]:
    """The checks in summary order: the model's leading ones, zero gradients, Square, black box, large ε."""
    checks: list[sanity.Check] = list(model.leading) if model is not None else []
    correct = [r for r in records if r["correct"]]
    if plan.masking_checks:
        for mode in plan.variants:
            masked = sum(1 for r in correct if r["gradient_masked"][mode])
            checks.append(sanity.zero_gradient_check(masked, len(correct), mode))
    order = component_order(plan)
    broken_by = {eps: dict(Counter(r["results"][e]["attack"] for r in correct if r["results"][e]["broken"]))
                 for e, eps in enumerate(plan.eps)}
    checks.append(sanity.square_check(_accuracy_after(plan, order, broken_by, len(correct)))
                  if plan.spec.name == "autoattack"
                  else sanity.Check("square-beats-white-box", "n/a", "applies to the AutoAttack standard suite"))
    black = {label for label in order if label.split("[")[0] == "square"}
    checks.append(sanity.black_box_check(broken_by, black, set(order) - black))
    if not plan.large_eps_check:
        checks.append(sanity.Check("large-eps", "n/a", "disabled"))
    elif model is not None and model.large is not None:
        large = model.large
        checks.append(sanity.large_eps_check(large["robust"], large["n"], large["eps"], plan.norm))
    return checks


def component_order(job: AttackJob | CheckPlan) -> list[str]:
    """The labels of the components in the order they run (per gradient variant)."""
    members = list(job.spec.members) if job.spec.is_suite else [job.spec.name]
    if len(job.variants) == 1:
        return members
    return [f"{m}[{mode}]" for mode in job.variants for m in members]


def _accuracy_after(job: AttackJob | CheckPlan, order: list[str], broken_by: dict[float, dict[str, int]],
                    correct: int) -> dict[str, dict[str, float]]:
    """Robust accuracy after each member, in the order they ran (per gradient variant), as AutoAttack tracks it."""
    accuracy_after: dict[str, dict[str, float]] = {}
    for eps, counts in broken_by.items():
        remaining = correct
        for mode in job.variants:
            key = f"eps={eps:g}" + (f" [{mode}]" if len(job.variants) > 1 else "")
            accs = {"clean": remaining / job.n}
            for label in order:
                if len(job.variants) > 1 and not label.endswith(f"[{mode}]"):
                    continue
                remaining -= counts.get(label, 0)
                accs[label.split("[")[0]] = remaining / job.n
            accuracy_after[key] = accs
    return accuracy_after


def large_eps_result(job: AttackJob, attacker: BatchAttacker, notes: set[str],
                     progress: bool = False) -> dict[str, Any]:
    """The attack once more at a very large ε on the first points (a gradient-masking check)."""
    eps = sanity.large_eps(job.norm, tuple(job.x.shape[1:]))
    subset = min(job.n, LARGE_EPS_SUBSET)
    robust = 0
    bar = AttackProgress(subset, progress, title=f"shard {job.shard.label}" if job.shard is not None else "")
    try:
        for start in range(0, subset, job.batch_size):
            stop = min(subset, start + job.batch_size)
            outcome = attacker.attack(LARGE_EPS_BATCH_OFFSET + start // job.batch_size, job.x[start:stop],
                                      job.y[start:stop], start, [eps], bar)
            notes |= outcome.notes
            robust += sum(1 for r in outcome.records if r["correct"] and not r["results"][0]["broken"])
            bar.finished(stop - start)
    finally:
        bar.close()
    return {"eps": eps, "n": subset, "robust": robust, "robust_accuracy": robust / subset}
