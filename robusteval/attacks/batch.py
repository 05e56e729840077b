"""The engine's inner loop: one batch of points attacked at every ε of a list.

1. Predict once on the clean points (the deployed decision: majority over
   fresh noise draws for randomized defenses); only correct points are attacked.
2. For each ε in increasing order: a point broken at a smaller ε keeps its
   adversarial example if it passes verification again at this ε; the
   remaining correct points go through the attack's components in order
   (for `--gradient auto`, first with exact gradients, then with BPDA), each
   component attacking only the points it has not broken yet (a point broken
   at a smaller ε only by an adaptive stage is attacked again, so the
   attack's own figure is its own).
3. Adaptive stages (`remedies`), on the points still standing: the
   scale-invariant remedies where the clean pass found softmax saturation in
   the batch, Square with 4× the queries and then (L∞) the vertex search where
   it found no usable gradient.
4. Every candidate is verified (`verification`); rejected candidates are
   counted, never used. Randomized pipelines: each final example is also
   judged on the fresh decision draws, fooled on any one (worst-of-N).

With a `partial` path the batch's state is saved after each ε, and a batch
started again continues from it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from robusteval.attacks import sanity
from robusteval.attacks.catalog import (
    AUTOATTACK_TARGETS,
    AttackComponent,
    build_attack,
    default_steps,
    seed_torch,
)
from robusteval.attacks.defenses import DeployedPipeline, Expectation
from robusteval.attacks.plan import AttackPlan
from robusteval.attacks.progress import AttackProgress
from robusteval.attacks.remedies import (
    SQUARE_QUERIES,
    gradient_free_escalation,
    saturation_remedies,
)
from robusteval.attacks.resume import BatchState
from robusteval.attacks.seeds import (
    CLEAN,
    GRADIENT,
    LARGE_EPS_BATCH_OFFSET,
    MINIMIZE,
    RECHECK,
    REMEDY,
    VERIFY,
    WORST_OF_N,
    attack_seed,
    derive_seed,
)
from robusteval.attacks.verification import (
    perturbation_norm,
    project_to_ball,
    verify_adversarial,
)
from robusteval.core.devices import device_label
from robusteval.records import AttackSample, EpsOutcome


@dataclass
class BatchOutcome:
    records: list[dict[str, Any]]
    adversarial: list[Tensor]  # per ε, (B, C, H, W) on the CPU
    notes: set[str]
    seconds: float  # time spent on the batch, including calls killed after saving part of it


@dataclass
class _Targets:
    """One batch at one ε: the points, which are still to break, and the candidates rejected so far."""

    b: int
    e: int
    eps: float
    n_eps: int  # how many ε the batch is attacked at (for the progress bar's share of the work done)
    x: Tensor
    y: Tensor
    correct: Tensor
    rejected: Tensor
    minimized: dict[tuple[int, int], Tensor] = field(default_factory=dict)


class BatchAttacker:
    """Attacks batches for one job with its deployed pipelines (one per gradient variant)."""

    def __init__(self, job: AttackPlan, pipelines: dict[str, DeployedPipeline], scale: int = 1):
        self.job = job
        self.pipelines = pipelines
        self.primary = pipelines[job.variants[0]]
        # The large-ε check's escalation multiplies the EOT draws and steps by `scale` (robusteval.attacks.reliability).
        self.scale = scale

    @property
    def eot(self) -> int:
        return self.job.eot * self.scale if self.primary.randomized else self.job.eot

    @property
    def steps(self) -> int | None:
        if self.scale == 1:
            return self.job.steps
        return (self.job.steps or default_steps(self.job.spec)) * self.scale

    def skipped_notes(self) -> set[str]:
        """Members that cannot run on this model (the same for every batch, resumed or not)."""
        job = self.job
        built = build_attack(job.spec, self.primary, self.primary, norm=job.norm, eps=job.eps[0],
                             num_classes=job.model.num_classes, device=job.device, eot=job.eot, steps=job.steps,
                             step_size=job.step_size)
        notes = {f"skipped {s}" for s in built.skipped}
        targeted = {"apgd-t", "fab-t"} & ({job.spec.name} | set(job.spec.members))
        if targeted and job.model.num_classes - 1 < AUTOATTACK_TARGETS:
            notes.add(f"{', '.join(sorted(targeted))}: {job.model.num_classes - 1} target class(es) instead of "
                      f"{AUTOATTACK_TARGETS} (the model has {job.model.num_classes} classes)")
        return notes

    def attack(self, b: int, x_cpu: Tensor, y_cpu: Tensor, offset: int, eps_list: Sequence[float],
               progress: AttackProgress, partial: Path | None = None) -> BatchOutcome:
        """Attack one batch at every ε; with `partial`, continue from and save the state after each ε."""
        started = time.perf_counter()
        x, y = x_cpu.to(self.job.device), y_cpu.to(self.job.device)
        saved = BatchState.load(partial, x.shape[0], len(eps_list)) if partial is not None else None
        state = (saved or self._fresh_state(b, x, y, x_cpu)).to(self.job.device)
        notes = set(state.notes)
        correct = state.clean_prediction == y
        targets = _Targets(b, 0, 0.0, len(eps_list), x, y, correct, correct)
        progress.advance(x.shape[0], state.finished_eps / len(eps_list))  # a resumed batch: its finished ε
        for e, eps in enumerate(eps_list):
            if e < state.finished_eps:
                continue  # finished before the previous call was killed
            targets.e, targets.eps = e, eps
            targets.rejected = torch.zeros(x.shape[0], dtype=torch.long, device=self.job.device)
            self._recheck(state, targets)
            self._attack_at(state, targets, notes, progress)
            self._record_eps(state, targets)
            progress.advance(x.shape[0], (e + 1) / len(eps_list))
            progress.postfix(e, correct, state.broken, 0)
            if partial is not None and e + 1 < len(eps_list):
                state.notes = sorted(notes)
                state.save(partial, state.seconds + time.perf_counter() - started)
        return BatchOutcome(self._records(state, b, y, offset, correct), state.adversarial, notes,
                            state.seconds + time.perf_counter() - started)

    # --- the steps of a batch -----------------------------------------------------------------------
    def _fresh_state(self, b: int, x: Tensor, y: Tensor, x_cpu: Tensor) -> BatchState:
        clean_prediction, masked, causes = self._clean_pass(b, x, y)
        size = x.shape[0]
        return BatchState(clean_prediction=clean_prediction.cpu(), masked=masked, adv=x_cpu.clone(),
                          broken=torch.zeros(size, dtype=torch.bool), final_prediction=clean_prediction.cpu(),
                          broken_by=[None] * size, per_eps=[[] for _ in range(size)], adversarial=[], notes=[],
                          seconds=0.0, standard=torch.zeros(size, dtype=torch.bool), causes=causes)

    def _clean_pass(self, b: int, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, list[bool]],
                                                                 dict[str, list[str | None]]]:
        """Clean predictions of a batch and, per gradient variant, which correct points have masked gradients
        and why ("saturation": the margin gradient is fine; "no-gradient": it is not)."""
        job = self.job
        masked: dict[str, list[bool]] = {}
        causes: dict[str, list[str | None]] = {}
        seed_torch(derive_seed(job.seed, CLEAN, b), job.device)
        if self.primary.randomized or not job.masking_checks:
            clean_prediction = self.primary.predict(x)
        else:
            # One pass gives the clean predictions and the input gradients of the gradient-masking check.
            clean_prediction, flags, dead = sanity.predict_with_gradient_check(self.primary, x, y)
            masked[job.variants[0]], causes[job.variants[0]] = flags.tolist(), _causes(flags, dead)
        correct = clean_prediction == y
        for v, mode in enumerate(job.variants):
            if mode in masked or not job.masking_checks:
                continue
            seed_torch(derive_seed(job.seed, GRADIENT, b, v), job.device)
            flags = torch.zeros(x.shape[0], dtype=torch.bool, device=job.device)
            dead = torch.zeros_like(flags)
            flags[correct], dead[correct] = sanity.gradient_masked(self.pipelines[mode], x[correct], y[correct])
            masked[mode], causes[mode] = flags.tolist(), _causes(flags, dead)
        return clean_prediction, masked, causes

    def _recheck(self, state: BatchState, t: _Targets) -> None:
        """A break at a smaller ε is inside this ball too; check it still fools a fresh pass."""
        if not bool(state.broken.any()):
            return
        idx = state.broken.nonzero().squeeze(1)
        seed_torch(derive_seed(self.job.seed, RECHECK, t.b, t.e), self.job.device)
        check = verify_adversarial(self.primary, t.x[idx], state.adv[idx], t.y[idx], self.job.norm, t.eps)
        lost = idx[~check.valid]
        state.final_prediction[idx] = check.prediction
        state.broken[lost] = False
        state.standard[lost] = False
        state.adv[lost] = t.x[lost]
        state.final_prediction[lost] = state.clean_prediction[lost]
        for i in lost.tolist():
            state.broken_by[i] = None

    def _attack_at(self, state: BatchState, t: _Targets, notes: set[str], progress: AttackProgress) -> None:
        """Every component of every gradient variant, then the adaptive stages the batch needs."""
        job = self.job
        # The attack's own components try every correct point they have not broken themselves.
        targets = t.correct & ~state.standard
        for v, mode in enumerate(job.variants):
            if not bool(targets.any()):
                break
            built = build_attack(job.spec, self.pipelines[mode], self._expected(self.pipelines[mode]),
                                 norm=job.norm, eps=t.eps, num_classes=job.model.num_classes, device=job.device,
                                 eot=self.eot, steps=self.steps, step_size=job.step_size)
            notes.update(f"skipped {s}" for s in built.skipped)
            for c, component in enumerate(built.components):
                idx = targets.nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                label = self._label(component.name, mode)
                self._describe(progress, state, t, label, idx)
                seed = None if component.minimization else attack_seed(job.seed, t.b, t.e, v)
                won = self._run_component(state, t, component, idx, v, c, seed)
                # This ε's share of the batch, split evenly over the variants and their components.
                done = (v + (c + 1) / len(built.components)) / len(job.variants)
                progress.advance(t.x.shape[0], (t.e + done) / t.n_eps)
                targets[won] = False
                state.standard[won] = True
                for i in won.tolist():
                    state.broken_by[i] = label
        self._adaptive_stages(state, t, notes, progress)

    def _adaptive_stages(self, state: BatchState, t: _Targets, notes: set[str], progress: AttackProgress) -> None:
        """The remedies for softmax saturation and the gradient-free escalation, on the points still standing.

        They run for a gradient variant when the clean pass found a correct point of the batch with that cause.
        """
        job = self.job
        for v, mode in enumerate(job.variants):
            causes = {cause for cause, ok in zip((state.causes or {}).get(mode, []), t.correct.tolist()) if ok}
            stages: list[AttackComponent] = []
            pipeline = self.pipelines[mode]
            if "saturation" in causes:
                stages += saturation_remedies(pipeline, norm=job.norm, eps=t.eps, num_classes=job.model.num_classes,
                                              device=job.device, eot=self.eot, steps=self.steps)
            # The large-ε check's escalation rounds (scale > 1) double the gradient attacks' budgets; Square's
            # escalation already ran once on these points at this ε.
            if "no-gradient" in causes and self.scale == 1:
                queries = (job.steps or SQUARE_QUERIES) if job.spec.name == "square" else SQUARE_QUERIES
                stages += gradient_free_escalation(self._expected(pipeline), norm=job.norm, eps=t.eps,
                                                   device=job.device, queries=queries)
            for c, component in enumerate(stages):
                idx = (t.correct & ~state.broken).nonzero().squeeze(1)
                if idx.numel() == 0:
                    return
                label = self._label(component.name, mode)
                notes.add(f"adaptive stage {label} ran on the points still standing")
                self._describe(progress, state, t, label, idx)
                seed = derive_seed(job.seed, REMEDY, t.b, t.e, v, c)
                won = self._run_component(state, t, component, idx, v, REMEDY_COMPONENTS + c, seed)
                for i in won.tolist():
                    state.broken_by[i] = label

    def _label(self, name: str, mode: str) -> str:
        return name if len(self.job.variants) == 1 else f"{name}[{mode}]"

    def _describe(self, progress: AttackProgress, state: BatchState, t: _Targets, label: str, idx: Tensor) -> None:
        where = "large-eps check" if t.b >= LARGE_EPS_BATCH_OFFSET else f"batch {t.b + 1}"
        progress.describe(where, t.eps, label)
        progress.postfix(t.e, t.correct, state.broken, int(idx.numel()))

    def _run_component(self, state: BatchState, t: _Targets, component: AttackComponent, idx: Tensor, v: int,
                       c: int, seed: int | None) -> Tensor:
        """One component on the points `idx`; keeps its verified examples and returns the points it broke.

        `seed`: the component's seed (None for a minimal-perturbation attack, seeded per batch).
        """
        job = self.job
        if component.minimization:
            if (v, c) not in t.minimized:
                # A minimal-perturbation attack runs once per batch, then is projected per ε.
                everyone = t.correct.nonzero().squeeze(1)
                found = t.x.clone()
                found[everyone] = component.run(t.x[everyone], t.y[everyone],
                                                derive_seed(job.seed, MINIMIZE, t.b, v, c))
                t.minimized[(v, c)] = found
            candidates = project_to_ball(t.x[idx], t.minimized[(v, c)][idx], job.norm, t.eps)
        else:
            assert seed is not None
            candidates = component.run(t.x[idx], t.y[idx], seed)
        seed_torch(derive_seed(job.seed, VERIFY, t.b, t.e, v, c), job.device)
        check = verify_adversarial(self.primary, t.x[idx], candidates, t.y[idx], job.norm, t.eps)
        t.rejected[idx] += (check.misclassified & ~check.valid).long()
        won = idx[check.valid]
        state.adv[won] = candidates[check.valid].to(state.adv.dtype)
        state.broken[won] = True
        state.final_prediction[won] = check.prediction[check.valid]
        return won

    def _record_eps(self, state: BatchState, t: _Targets) -> None:
        norms = perturbation_norm(state.adv - t.x, self.job.norm).tolist()
        broken, prediction = state.broken.tolist(), state.final_prediction.tolist()
        standard, rejected = state.standard.tolist(), t.rejected.tolist()
        worst = self._worst_of_n(state, t).tolist() if self.primary.randomized else None
        for i in range(t.x.shape[0]):
            state.per_eps[i].append(EpsOutcome(
                eps=t.eps, broken=broken[i], attack=state.broken_by[i], prediction=prediction[i],
                perturbation_norm=norms[i] if broken[i] else 0.0, rejected=rejected[i], standard_broken=standard[i],
                worst_broken=None if worst is None else worst[i],
            ).to_json())
        state.adversarial.append(state.adv.detach().to("cpu", copy=True))

    def _worst_of_n(self, state: BatchState, t: _Targets) -> Tensor:
        """(B,) bool: broken, or a correct point whose example is fooled on one of the fresh decision draws.

        A point fooled so at a smaller ε stays so: its example lies inside this ball too.
        """
        earlier = [bool(outcomes and outcomes[-1].get("worst_broken")) for outcomes in state.per_eps]
        worst = (state.broken | torch.tensor(earlier, dtype=torch.bool, device=state.broken.device)) & t.correct
        standing = (t.correct & ~worst).nonzero().squeeze(1)
        if standing.numel():
            seed_torch(derive_seed(self.job.seed, WORST_OF_N, t.b, t.e), self.job.device)
            worst[standing] = self.primary.fooled_on_any_draw(state.adv[standing], t.y[standing])
        return worst

    def _records(self, state: BatchState, b: int, y: Tensor, offset: int, correct: Tensor) -> list[dict[str, Any]]:
        job = self.job
        labels, clean, correct_list = y.tolist(), state.clean_prediction.tolist(), correct.tolist()
        return [AttackSample(
            index=offset + i, batch=b, label=labels[i], clean_prediction=clean[i], correct=correct_list[i],
            gradient_masked=({mode: state.masked[mode][i] for mode in job.variants}
                             if correct_list[i] and job.masking_checks else None),
            results=[EpsOutcome(**outcome) for outcome in state.per_eps[i]], device=device_label(job.device),
            gradient_cause=({mode: state.causes[mode][i] for mode in job.variants}
                            if correct_list[i] and job.masking_checks and state.causes else None),
        ).to_json() for i in range(len(labels))]

    def _expected(self, pipeline: DeployedPipeline) -> torch.nn.Module:
        return Expectation(pipeline, self.eot) if pipeline.randomized and self.eot > 1 else pipeline


# Verification seeds of the adaptive stages are numbered from here, apart from the attack's own components.
REMEDY_COMPONENTS = 1000


def _causes(masked: Tensor, dead: Tensor) -> list[str | None]:
    return ["no-gradient" if d else "saturation" if m else None for m, d in zip(masked.tolist(), dead.tolist())]
