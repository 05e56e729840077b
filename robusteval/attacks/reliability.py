"""The checks a finished attack run gets: AutoAttack's flags, zero gradients, Square vs white-box, large ε,
and the gap between the majority-vote and worst-of-N decisions of a randomized pipeline.

Their verdicts (`sanity.Check`) go to summary.json as `checks`, and the failed
ones as `flags`: reasons the robust accuracy may be an overestimate.

The large-ε check escalates before it flags: while robust accuracy at the
large ε is above 2%, the survivors are attacked again with the EOT draws
(randomized pipelines) and the steps doubled, then doubled again, up to
`ESCALATION_DOUBLINGS` rounds (a ceiling of 8× the run's budget). The flag
stays only when the ceiling is reached, with the figure reached there.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from robusteval.attacks import sanity
from robusteval.attacks.batch import BatchAttacker
from robusteval.attacks.catalog import AttackSpec, seed_torch
from robusteval.attacks.plan import AttackPlan
from robusteval.attacks.progress import AttackProgress
from robusteval.attacks.remedies import (
    escalation_names,
    is_black_box,
    saturation_remedy_names,
)
from robusteval.attacks.seeds import CHECKS, LARGE_EPS_BATCH_OFFSET, derive_seed

LARGE_EPS_SUBSET = 100
ESCALATION_DOUBLINGS = 3
# AutoAttack's randomness / output-range / dynamic checks look at this many points (a qualitative property).
CHECK_POINTS = 64


@dataclass
class ModelChecks:
    """The checks that run the model again, on the run's first points: AutoAttack's flags (or the note that the
    masking checks are off) and the large-ε attack, with what the record checks need to know of the model
    (its classes: which remedies could run; whether its pipeline is randomized). A sharded run computes them
    in the shard holding batch 0."""

    leading: list[sanity.Check]
    large: dict[str, Any] | None
    num_classes: int
    randomized: bool

    def to_json(self) -> dict[str, Any]:
        return {"leading": [c.as_dict() for c in self.leading], "large": self.large,
                "num_classes": self.num_classes, "randomized": self.randomized}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelChecks:
        return cls([sanity.Check(c["check"], c["status"], c["message"]) for c in data["leading"]], data["large"],
                   int(data["num_classes"]), bool(data["randomized"]))


def run_checks(job: AttackPlan, attacker: BatchAttacker, records: list[dict[str, Any]], notes: set[str],
               progress: bool = False, with_model: bool = True) -> tuple[list[sanity.Check], ModelChecks | None]:
    """Every check of a finished run, and the model's part of them (None when `with_model` is False)."""
    model = model_checks(job, attacker, notes, progress) if with_model else None
    plan = CheckPlan.of(job, job.model.num_classes, attacker.primary.randomized)
    return record_checks(plan, records, model), model


def model_checks(job: AttackPlan, attacker: BatchAttacker, notes: set[str], progress: bool = False) -> ModelChecks:
    """The checks that attack or query the model again (each seeded on its own, so any process computes them)."""
    primary = attacker.primary
    first = slice(0, min(job.n, job.batch_size, CHECK_POINTS))
    seed_torch(derive_seed(job.seed, CHECKS), job.device)
    if job.masking_checks:
        leading = sanity.autoattack_checks(primary, job.x[first].to(job.device), job.y[first].to(job.device),
                                           randomized=primary.randomized, eot=job.eot,
                                           adaptive_denoise=job.defense.differentiates_through)
    else:
        leading = sanity.masking_checks_disabled(primary.randomized, job.eot, job.variants)
    large = large_eps_result(job, attacker, notes, progress) if job.large_eps_check else None
    return ModelChecks(list(leading), large, job.model.num_classes, primary.randomized)


@dataclass(frozen=True)
class CheckPlan:
    """What the record-based checks need of a run: its configuration and two facts of its model, not the model
    itself (merge has none)."""

    spec: AttackSpec
    variants: list[str]
    n: int
    eps: list[float]
    norm: str
    masking_checks: bool
    large_eps_check: bool
    num_classes: int
    randomized: bool

    @classmethod
    def of(cls, job: AttackPlan, num_classes: int, randomized: bool) -> CheckPlan:
        return cls(job.spec, list(job.variants), job.n, list(job.eps), job.norm, job.masking_checks,
                   job.large_eps_check, num_classes, randomized)


def record_checks(plan: CheckPlan, records: list[dict[str, Any]], model: ModelChecks | None) -> list[sanity.Check]:
    """The checks in summary order: the model's leading ones, zero gradients, Square, black box, the decision
    gap of a randomized pipeline, large ε."""
    checks: list[sanity.Check] = list(model.leading) if model is not None else []
    correct = [r for r in records if r["correct"]]
    if plan.masking_checks:
        checks += [_zero_gradient_check(plan, correct, mode) for mode in plan.variants]
    order = component_order(plan)
    broken_by = {eps: dict(Counter(r["results"][e]["attack"] for r in correct if r["results"][e]["broken"]))
                 for e, eps in enumerate(plan.eps)}
    checks.append(sanity.square_check(_accuracy_after(plan, order, broken_by, len(correct)))
                  if plan.spec.name == "autoattack"
                  else sanity.Check("square-beats-white-box", "n/a", "applies to the AutoAttack standard suite"))
    labels = set(order) | {label for counts in broken_by.values() for label in counts}
    black = {label for label in labels if is_black_box(label)}
    checks.append(sanity.black_box_check(broken_by, black, labels - black))
    if plan.randomized:
        checks.append(sanity.decision_gap_check(_decision_counts(plan, correct)))
    if not plan.large_eps_check:
        checks.append(sanity.Check("large-eps", "n/a", "disabled"))
    elif model is not None and model.large is not None:
        large = model.large
        checks.append(sanity.large_eps_check(large["robust"], large["n"], large["eps"], plan.norm,
                                             escalation=large["escalation"], ceiling=2 ** ESCALATION_DOUBLINGS))
    return checks


def _zero_gradient_check(plan: CheckPlan, correct: list[dict[str, Any]], mode: str) -> sanity.Check:
    """The zero-gradient check of one gradient variant, with its cause and the adaptive stages that ran.

    Records written before causes were recorded count every masked point as "no usable gradient".
    """
    masked = [r for r in correct if r["gradient_masked"][mode]]
    dead = sum(1 for r in masked if (r.get("gradient_cause") or {}).get(mode, "no-gradient") == "no-gradient")
    suffix = "" if len(plan.variants) == 1 else f"[{mode}]"
    remedies = [n + suffix for n in saturation_remedy_names(plan.num_classes)] if len(masked) > dead else []
    escalation = [n + suffix for n in escalation_names(plan.norm)] if dead else []
    return sanity.zero_gradient_check(len(masked), len(correct), mode, dead=dead, remedies=remedies,
                                      escalation=escalation)


def _decision_counts(plan: CheckPlan, correct: list[dict[str, Any]]) -> dict[float, tuple[int, int, int]]:
    """Per ε: (robust by majority vote, robust worst-of-N, n) of a randomized pipeline."""
    counts = {}
    for e, eps in enumerate(plan.eps):
        outcomes = [r["results"][e] for r in correct]
        majority = sum(1 for o in outcomes if not o["broken"])
        worst = sum(1 for o in outcomes if not (o["broken"] or o.get("worst_broken")))
        counts[eps] = (majority, worst, plan.n)
    return counts


def component_order(job: AttackPlan | CheckPlan) -> list[str]:
    """The labels of the components in the order they run (per gradient variant)."""
    members = list(job.spec.members) if job.spec.is_suite else [job.spec.name]
    if len(job.variants) == 1:
        return members
    return [f"{m}[{mode}]" for mode in job.variants for m in members]


def _accuracy_after(job: AttackPlan | CheckPlan, order: list[str], broken_by: dict[float, dict[str, int]],
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


def large_eps_result(job: AttackPlan, attacker: BatchAttacker, notes: set[str],
                     progress: bool = False) -> dict[str, Any]:
    """The attack once more at a very large ε on the first points (a gradient-masking check), escalated while
    more than 2% survive: EOT draws and steps doubled per round, at most ESCALATION_DOUBLINGS rounds."""
    eps = sanity.large_eps(job.norm, tuple(job.x.shape[1:]))
    subset = min(job.n, LARGE_EPS_SUBSET)
    standing = _survivors(attacker, list(range(subset)), LARGE_EPS_BATCH_OFFSET, eps, notes, progress)
    rounds: list[dict[str, Any]] = []
    for r in range(1, ESCALATION_DOUBLINGS + 1):
        if not standing or len(standing) / subset <= sanity.LARGE_EPS_ACCURACY_LIMIT:
            break
        escalated = BatchAttacker(job, attacker.pipelines, scale=2 ** r)
        standing = _survivors(escalated, standing, LARGE_EPS_BATCH_OFFSET * (r + 1), eps, notes, progress)
        rounds.append({"scale": 2 ** r, "eot": escalated.eot, "steps": escalated.steps, "robust": len(standing),
                       "robust_accuracy": len(standing) / subset})
    return {"eps": eps, "n": subset, "robust": len(standing), "robust_accuracy": len(standing) / subset,
            "escalation": rounds}


def _survivors(attacker: BatchAttacker, indices: list[int], batch_offset: int, eps: float, notes: set[str],
               progress: bool) -> list[int]:
    """The points of `indices` (into the job's data) that stay correct and unbroken at `eps`."""
    job = attacker.job
    standing: list[int] = []
    bar = AttackProgress(len(indices), progress, title=f"shard {job.shard.label}" if job.shard is not None else "")
    try:
        for start in range(0, len(indices), job.batch_size):
            chunk = torch.tensor(indices[start:start + job.batch_size])
            outcome = attacker.attack(batch_offset + start // job.batch_size, job.x[chunk], job.y[chunk], 0, [eps],
                                      bar)
            notes |= outcome.notes
            standing += [int(chunk[i]) for i, r in enumerate(outcome.records)
                         if r["correct"] and not r["results"][0]["broken"]]
            bar.finished(len(chunk))
    finally:
        bar.close()
    return standing
