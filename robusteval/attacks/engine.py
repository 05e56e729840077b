"""The attack engine: one loop for every attack, suite, ε list and defense.

For each batch of points (moved to the device one batch at a time):

1. Predict once on clean inputs (the deployed decision: majority over fresh
   noise draws for randomized defenses); only correct points are attacked.
2. For each ε in increasing order: a point broken at a smaller ε keeps its
   adversarial example if it passes verification again at this ε; the
   remaining correct points go through the attack's components in order
   (for `--gradient auto`, first with exact gradients, then with BPDA), each
   component attacking only the points still unbroken.
3. Every candidate is verified: finite, within the ε-ball (tolerance 1e-6),
   inside [0, 1], misclassified on a fresh forward pass. Rejected
   candidates are counted, never used.

Each batch writes its adversarial examples (one shard, atomically) and then
appends its records to samples.jsonl; within a batch, the state after each ε
is saved too (atomically), so a killed run resumes from the last finished
(batch, ε). Every random draw is seeded from (seed, batch, ε, …), so a
resumed run produces exactly the summary of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from robusteval.attacks.catalog import (
    AUTOATTACK_TARGETS,
    AttackSpec,
    build_attack,
    check_norm,
    resolve_attack,
    resolve_norm,
    seed_torch,
)
from robusteval.attacks import sanity
from robusteval.attacks.defenses import (
    DECISION_DRAWS,
    GRADIENT_MODES,
    DeployedPipeline,
    Expectation,
    parse_defense,
    require_defense_capabilities,
)
from robusteval.checkpoints import atomic_write_bytes
from robusteval.data import ImageDataset
from robusteval.interface import JointModel, trusted_inputs, validate_images
from robusteval.job_checks import check_data_fits_model, check_eps_budget
from robusteval.runs import SUMMARY_FILE, RunDirectory, RunFileDamaged, read_json_file

logger = logging.getLogger(__name__)

KIND = "attack"
# Small images attack fastest in large batches (per-call overhead, Square's 5,000 queries per batch);
# the state is saved after every ε of a batch, so a large batch loses little work to a kill.
DEFAULT_BATCH_SIZE = 500
BALL_TOLERANCE = 1e-6
LARGE_EPS_SUBSET = 100
# AutoAttack's randomness / output-range / dynamic checks look at this many points (a qualitative property).
CHECK_POINTS = 64
DEFAULT_EOT = 20

DEFAULT_EPS: dict[str, dict[str, tuple[float, ...]]] = {
    "digits": {"Linf": (0.05, 0.1, 0.15, 0.2, 0.3), "L2": (0.25, 0.5, 1.0, 1.5, 2.0)},
    "mnist": {"Linf": (0.1, 0.2, 0.3), "L2": (0.5, 1.0, 1.5, 2.0)},
    "fashion-mnist": {"Linf": (0.05, 0.1, 0.2), "L2": (0.5, 1.0, 1.5)},
    "cifar10": {"Linf": (2 / 255, 4 / 255, 8 / 255), "L2": (0.25, 0.5)},
}

# Seed streams: each random draw has its own key (seed, stream, batch, ...).
_CLEAN, _GRADIENT, _RECHECK, _ATTACK, _VERIFY, _MINIMIZE, _CHECKS = range(7)
_LARGE_EPS_BATCH_OFFSET = 1_000_000


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from integers (numpy's SeedSequence), independent of anything run before."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint32)[0])


def attack_seed(seed: int, batch: int, eps_index: int, variant: int = 0) -> int:
    """The seed the engine gives every component of an attack at (batch, ε index, gradient variant).

    All members of a suite share it, as AutoAttack's own loop does.
    """
    return derive_seed(seed, _ATTACK, batch, eps_index, variant)


def default_eps(dataset: str, norm: str) -> tuple[float, ...]:
    """The ε grid for a data set and norm; unknown data sets need an explicit ε list."""
    if dataset not in DEFAULT_EPS:
        raise ValueError(f"there is no default eps list for data set '{dataset}'; pass eps explicitly "
                         f"(--eps 0.1,0.2,...). Defaults exist for: {', '.join(DEFAULT_EPS)}")
    return DEFAULT_EPS[dataset][norm]


def perturbation_norm(delta: Tensor, norm: str) -> Tensor:
    """Per-row L∞ or L2 norm, computed in float64."""
    flat = delta.detach().flatten(1).double()
    if norm == "Linf":
        return flat.abs().amax(1) if flat.shape[1] else flat.new_zeros(flat.shape[0])
    return flat.norm(dim=1)


def project_to_ball(x: Tensor, x_adv: Tensor, norm: str, eps: float) -> Tensor:
    """Project x_adv onto the ε-ball around x (stays in [0, 1] when x and x_adv are)."""
    delta = x_adv - x
    if norm == "Linf":
        return x + delta.clamp(-eps, eps)
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = torch.clamp(eps / norms, max=1.0).view(-1, *([1] * (x.dim() - 1)))
    return x + delta * factor


@dataclass
class Verification:
    """Per-point outcome of verifying candidate adversarial examples."""

    valid: Tensor  # finite, in the ball, in [0, 1] and misclassified
    prediction: Tensor
    misclassified: Tensor
    in_ball: Tensor
    in_box: Tensor
    finite: Tensor
    norms: Tensor


@torch.no_grad()
def verify_adversarial(pipeline: DeployedPipeline, x: Tensor, x_adv: Tensor, y: Tensor, norm: str,
                       eps: float) -> Verification:
    """Check candidates: finite, ‖x_adv − x‖ ≤ ε + 1e-6, inside [0, 1], and misclassified on a fresh pass.

    The prediction is the pipeline's deployed decision (for randomized
    defenses the majority over fresh noise draws).
    """
    if x_adv.shape != x.shape:
        raise ValueError(f"adversarial examples have shape {tuple(x_adv.shape)}, expected {tuple(x.shape)}")
    flat = x_adv.flatten(1)
    finite = torch.isfinite(flat).all(1)
    safe = torch.where(finite.view(-1, *([1] * (x.dim() - 1))), x_adv, x)
    norms = perturbation_norm(safe - x, norm)
    in_ball = finite & (norms <= eps + BALL_TOLERANCE)
    in_box = finite & (flat >= 0).all(1) & (flat <= 1).all(1)
    with trusted_inputs():  # out-of-box candidates are what is being checked, not a caller's error
        prediction = pipeline.predict(safe)
    misclassified = finite & (prediction != y)
    return Verification(in_ball & in_box & misclassified, prediction, misclassified, in_ball, in_box, finite, norms)


# --- results ------------------------------------------------------------------------------------------
@dataclass
class CurvePoint:
    eps: float
    robust_accuracy: float
    ci_low: float
    ci_high: float
    broken_by: dict[str, int]
    robust: int = 0
    rejected: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"eps": self.eps, "robust_accuracy": self.robust_accuracy, "ci_low": self.ci_low,
                "ci_high": self.ci_high, "broken_by": dict(self.broken_by), "robust": self.robust,
                "rejected": self.rejected}


@dataclass
class AttackResult:
    """The figures of summary.json, plus the per-point records and adversarial examples.

    `curve[i].robust_accuracy` is the fraction of all n points that are
    correctly classified and not broken at `curve[i].eps`, with a 95%
    Clopper–Pearson interval.
    """

    model: str
    dataset: str
    n: int
    attack: str
    norm: str
    defense: str
    clean_accuracy: float
    curve: list[CurvePoint]
    flags: list[str]
    seconds: float
    gradient: str
    eot: int
    seed: int
    batch_size: int
    checks: list[dict[str, str]]
    large_eps: dict[str, Any] | None
    notes: list[str]
    kind: str = KIND
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
    def from_summary(cls, summary: dict[str, Any]) -> AttackResult:
        """Rebuild a result from a summary.json (records and adversarial examples are not in it)."""
        curve = [CurvePoint(float(p["eps"]), p["robust_accuracy"], p["ci_low"], p["ci_high"], dict(p["broken_by"]),
                            robust=p.get("robust", 0), rejected=p.get("rejected", 0)) for p in summary["curve"]]
        fields = {k: summary[k] for k in ("model", "dataset", "n", "attack", "norm", "defense", "clean_accuracy",
                                          "flags", "seconds", "gradient", "eot", "seed", "batch_size", "checks",
                                          "large_eps", "notes")}
        return cls(curve=curve, kind=summary["kind"], **fields)

    def summary(self) -> dict[str, Any]:
        """Exactly what summary.json holds."""
        return {
            "kind": self.kind, "model": self.model, "dataset": self.dataset, "n": self.n, "attack": self.attack,
            "norm": self.norm, "defense": self.defense, "clean_accuracy": self.clean_accuracy,
            "curve": [p.as_dict() for p in self.curve], "flags": list(self.flags), "seconds": self.seconds,
            "gradient": self.gradient, "eot": self.eot, "seed": self.seed, "batch_size": self.batch_size,
            "checks": list(self.checks), "large_eps": self.large_eps, "notes": list(self.notes),
        }


# --- the job --------------------------------------------------------------------------------------------
@dataclass
class _BatchOutcome:
    records: list[dict[str, Any]]
    adversarial: list[Tensor]  # per ε, (B, C, H, W) on the CPU
    notes: set[str]
    seconds: float  # time spent on the batch, including calls killed after saving part of it


class AttackJob:
    """A resolved attack evaluation; `config` is what identifies it on disk."""

    def __init__(self, model: JointModel, x: Tensor, y: Tensor, *, model_name: str, dataset_name: str,
                 spec: AttackSpec, norm: str, eps: list[float], defense: str, gradient: str, eot: int,
                 steps: int | None, step_size: float | None, seed: int, batch_size: int, device: torch.device,
                 large_eps_check: bool, checkpoint: str | None, masking_checks: bool = True):
        self.model = model
        self.x = x
        self.y = y
        self.spec = spec
        self.norm = norm
        self.eps = eps
        self.defense = parse_defense(defense)
        self.gradient = gradient
        self.eot = eot
        self.steps = steps
        self.step_size = step_size
        self.seed = seed
        self.batch_size = batch_size
        self.device = device
        self.large_eps_check = large_eps_check
        self.masking_checks = masking_checks
        self.variants = ["full", "bpda"] if gradient == "auto" else [gradient]
        self.config: dict[str, Any] = {
            "kind": KIND, "model": model_name, "checkpoint": checkpoint, "model_fingerprint": _fingerprint(model),
            "dataset": dataset_name, "n": int(x.shape[0]), "attack": spec.name, "norm": norm, "eps": list(eps),
            "defense": str(self.defense), "gradient": gradient, "eot": eot, "steps": steps, "step_size": step_size,
            "seed": seed, "batch_size": batch_size, "device": str(device), "decision_draws": DECISION_DRAWS,
            "large_eps_check": large_eps_check, "masking_checks": masking_checks,
        }

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    def run_dir_parts(self) -> list[str]:
        """Readable parts of the default run directory name."""
        parts = [self.config["model"], self.config["dataset"], self.spec.name, self.norm]
        if self.defense.kind != "none":
            parts.append(str(self.defense))
        return parts

    # --- running --------------------------------------------------------------------------------
    def run(self, out: str | Path | None = None, resume: bool = True, progress: bool = False, wait: bool = False,
            on_wait: Callable[[str], None] | None = None) -> AttackResult:
        """Run (or resume) the evaluation; with `out=None` nothing is written to disk.

        The run directory is locked while the job works in it: another process
        there makes this one stop (RunDirectoryBusy), or wait with `wait=True`
        (`on_wait` hears whom it waits for).
        """
        started = time.perf_counter()
        if out is None:
            return self._run(None, started, progress)
        with RunDirectory(out, self.config, resume=resume, wait=wait,
                          on_wait=on_wait or logger.warning) as run_dir:
            run_dir.check_records(range(self.n), check=self._record_problem)
            return self._run(run_dir, started, progress)

    def _record_problem(self, record: dict[str, Any]) -> str | None:
        """What makes a stored record impossible for this job (None when it fits)."""
        batch = record.get("batch")
        if not isinstance(batch, int) or not 0 <= batch * self.batch_size < self.n:
            return f"batch {batch!r} does not exist with {self.n} points in batches of {self.batch_size}"
        if not batch * self.batch_size <= record["index"] < (batch + 1) * self.batch_size:
            return f"image {record['index']} cannot belong to batch {batch} (batches of {self.batch_size})"
        results = record.get("results")
        if not isinstance(results, list) or [r.get("eps") if isinstance(r, dict) else None for r in results] \
                != list(self.eps):
            return f"its results are not one per configured eps ({', '.join(f'{e:g}' for e in self.eps)})"
        if not isinstance(record.get("correct"), bool):
            return "it has no clean result ('correct')"
        return None

    def _run(self, run_dir: RunDirectory | None, started: float, progress: bool) -> AttackResult:
        records: list[dict[str, Any]] = run_dir.records if run_dir is not None else []
        done = {r["batch"] for r in records}
        n_batches = math.ceil(self.n / self.batch_size)
        if run_dir is not None and len(done) == n_batches and run_dir.artifact(SUMMARY_FILE).exists():
            finished = self._finished(run_dir, records)
            if finished is not None:
                return finished
        adversarial: dict[int, list[Tensor]] = {}
        notes: set[str] = set()
        batch_wall = 0.0  # seconds this call spent inside batches
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        was_training = self.model.training
        self.model.eval()
        bar = _progress_bar(self.n, progress, initial=sum(1 for r in records))
        robust_done = [sum(1 for r in records if r["correct"] and not r["results"][e]["broken"])
                       for e in range(len(self.eps))]
        try:
            with torch.random.fork_rng(devices=devices), trusted_inputs(), _autoattack_log_captured():
                pipelines = {mode: DeployedPipeline(self.model, self.defense, mode) for mode in self.variants}
                # Members that cannot run on this model (the same for every batch, resumed or not).
                notes |= self._skipped(pipelines[self.variants[0]])
                for b in range(n_batches):
                    start, stop = b * self.batch_size, min(self.n, (b + 1) * self.batch_size)
                    if b in done:
                        adversarial[b] = self._load_shard(run_dir, b, start, stop)
                        continue
                    partial = run_dir.artifact(_partial_name(b)) if run_dir is not None else None
                    batch_started = time.perf_counter()
                    outcome = self._attack_batch(pipelines, b, self.x[start:stop], self.y[start:stop], start,
                                                 self.eps, bar=bar, robust_done=robust_done, partial=partial)
                    batch_wall += time.perf_counter() - batch_started
                    for record in outcome.records:
                        record["batch_seconds"] = round(outcome.seconds, 3)
                    notes |= outcome.notes
                    adversarial[b] = outcome.adversarial
                    if run_dir is not None:
                        _save_atomically(run_dir.artifact(_shard_name(b)), list(outcome.adversarial))
                        run_dir.append_batch(b, outcome.records)
                        partial.unlink(missing_ok=True)
                    records.extend(outcome.records)
                    for e in range(len(self.eps)):
                        robust_done[e] += sum(1 for r in outcome.records
                                              if r["correct"] and not r["results"][e]["broken"])
                    bar.update(stop - start)
                bar.close()
                records.sort(key=lambda r: r["index"])
                merged = {eps: torch.cat([adversarial[b][e] for b in range(n_batches)])
                          for e, eps in enumerate(self.eps)}
                checks, large = self._checks(pipelines, records, notes, progress)
        finally:
            bar.close()
            self.model.train(was_training)
        if run_dir is not None:
            for eps, tensor in merged.items():
                _save_atomically(run_dir.artifact(adversarial_file_name(eps)), tensor)
            for b in range(n_batches):
                run_dir.artifact(_shard_name(b)).unlink(missing_ok=True)
                # Left behind when a kill came between a batch's records and the removal of its partial state.
                run_dir.artifact(_partial_name(b)).unlink(missing_ok=True)
        # Every batch's own time (in whichever process ran it, parts of a batch cut by a kill included), plus
        # this call's work outside the batches (loading, checks): the time of all processes, not the last one's.
        batches = sum({r["batch"]: r.get("batch_seconds", 0.0) for r in records}.values())
        overhead = time.perf_counter() - started - batch_wall
        result = self._result(records, checks, large, sorted(notes), seconds=round(batches + overhead, 3))
        result.adversarial = merged
        result.records = records
        result.run_dir = run_dir.path if run_dir is not None else None
        if run_dir is not None:
            run_dir.write_summary(result.summary())
        return result

    # --- one batch ------------------------------------------------------------------------------
    def _attack_batch(self, pipelines: dict[str, DeployedPipeline], b: int, x_cpu: Tensor, y_cpu: Tensor,
                      offset: int, eps_list: Sequence[float], bar: Any = None,
                      robust_done: list[int] | None = None, partial: Path | None = None) -> _BatchOutcome:
        """Attack one batch at every ε; with `partial`, continue from and save the state after each ε."""
        started = time.perf_counter()
        x = x_cpu.to(self.device)
        y = y_cpu.to(self.device)
        size = x.shape[0]
        primary = pipelines[self.variants[0]]
        state = _load_partial(partial, size, len(eps_list)) if partial is not None else None
        if state is None:
            clean_prediction, masked = self._clean_pass(pipelines, b, x, y)
            state = {"clean_prediction": clean_prediction.cpu(), "masked": masked, "adv": x_cpu.clone(),
                     "broken": torch.zeros(size, dtype=torch.bool), "final_prediction": clean_prediction.cpu(),
                     "broken_by": [None] * size, "per_eps": [[] for _ in range(size)], "adversarial": [],
                     "notes": [], "seconds": 0.0}
        # Copies: the working tensors change in place, and a loaded "adv" shares storage with the last ε's examples.
        clean_prediction = state["clean_prediction"].to(self.device, copy=True)
        masked: dict[str, list[bool]] = state["masked"]
        adv = state["adv"].to(self.device, copy=True)
        broken = state["broken"].to(self.device, copy=True)
        final_prediction = state["final_prediction"].to(self.device, copy=True)
        broken_by: list[str | None] = state["broken_by"]
        per_eps: list[list[dict[str, Any]]] = state["per_eps"]
        adversarial: list[Tensor] = state["adversarial"]
        notes: set[str] = set(state["notes"])
        correct = clean_prediction == y
        minimized: dict[tuple[int, int], Tensor] = {}
        for e, eps in enumerate(eps_list):
            if e < len(adversarial):
                continue  # finished before the previous call was killed
            rejected = torch.zeros(size, dtype=torch.long, device=self.device)
            if bool(broken.any()):
                # A break at a smaller ε is inside this ball too; check it still fools a fresh pass.
                idx = broken.nonzero().squeeze(1)
                seed_torch(derive_seed(self.seed, _RECHECK, b, e), self.device)
                check = verify_adversarial(primary, x[idx], adv[idx], y[idx], self.norm, eps)
                lost = idx[~check.valid]
                final_prediction[idx] = check.prediction
                broken[lost] = False
                adv[lost] = x[lost]
                final_prediction[lost] = clean_prediction[lost]
                for i in lost.tolist():
                    broken_by[i] = None
            targets = correct & ~broken
            for v, mode in enumerate(self.variants):
                if not bool(targets.any()):
                    break
                built = build_attack(self.spec, pipelines[mode], self._expected(pipelines[mode]),
                                     norm=self.norm, eps=eps, num_classes=self.model.num_classes, device=self.device,
                                     eot=self.eot, steps=self.steps, step_size=self.step_size)
                notes.update(f"skipped {s}" for s in built.skipped)
                seed = attack_seed(self.seed, b, e, v)
                for c, component in enumerate(built.components):
                    idx = targets.nonzero().squeeze(1)
                    if idx.numel() == 0:
                        break
                    label = component.name if len(self.variants) == 1 else f"{component.name}[{mode}]"
                    if bar is not None:
                        where = "large-eps check" if b >= _LARGE_EPS_BATCH_OFFSET else f"batch {b + 1}"
                        bar.set_description(f"{where} eps={eps:g} {label}")
                        self._postfix(bar, e, robust_done, correct, broken, int(idx.numel()))
                    if component.minimization:
                        if (v, c) not in minimized:
                            # A minimal-perturbation attack runs once per batch, then is projected per ε.
                            everyone = correct.nonzero().squeeze(1)
                            found = x.clone()
                            found[everyone] = component.run(x[everyone], y[everyone],
                                                            derive_seed(self.seed, _MINIMIZE, b, v, c))
                            minimized[(v, c)] = found
                        candidates = project_to_ball(x[idx], minimized[(v, c)][idx], self.norm, eps)
                    else:
                        candidates = component.run(x[idx], y[idx], seed)
                    seed_torch(derive_seed(self.seed, _VERIFY, b, e, v, c), self.device)
                    check = verify_adversarial(primary, x[idx], candidates, y[idx], self.norm, eps)
                    rejected[idx] += (check.misclassified & ~check.valid).long()
                    won = idx[check.valid]
                    adv[won] = candidates[check.valid].to(adv.dtype)
                    broken[won] = True
                    targets[won] = False
                    final_prediction[won] = check.prediction[check.valid]
                    for i in won.tolist():
                        broken_by[i] = label
            norms = perturbation_norm(adv - x, self.norm).tolist()
            broken_list, prediction_list, rejected_list = broken.tolist(), final_prediction.tolist(), rejected.tolist()
            for i in range(size):
                per_eps[i].append({
                    "eps": eps, "broken": broken_list[i], "attack": broken_by[i], "prediction": prediction_list[i],
                    "perturbation_norm": norms[i] if broken_list[i] else 0.0, "rejected": rejected_list[i],
                })
            adversarial.append(adv.detach().to("cpu", copy=True))
            if bar is not None:
                self._postfix(bar, e, robust_done, correct, broken, 0)
            if partial is not None and e + 1 < len(eps_list):
                _save_atomically(partial, {
                    **state, "adv": adversarial[-1], "broken": broken.cpu(), "final_prediction": final_prediction.cpu(),
                    "notes": sorted(notes), "seconds": state["seconds"] + time.perf_counter() - started})

        labels, clean, correct_list = y.tolist(), clean_prediction.tolist(), correct.tolist()
        records = [{
            "index": offset + i, "batch": b, "label": labels[i], "clean_prediction": clean[i],
            "correct": correct_list[i],
            "gradient_masked": ({mode: masked[mode][i] for mode in self.variants}
                                if correct_list[i] and self.masking_checks else None),
            "results": per_eps[i],
        } for i in range(size)]
        return _BatchOutcome(records, adversarial, notes, state["seconds"] + time.perf_counter() - started)

    def _clean_pass(self, pipelines: dict[str, DeployedPipeline], b: int, x: Tensor,
                    y: Tensor) -> tuple[Tensor, dict[str, list[bool]]]:
        """Clean predictions of a batch and, per gradient variant, which correct points have masked gradients."""
        primary = pipelines[self.variants[0]]
        masked: dict[str, list[bool]] = {}
        seed_torch(derive_seed(self.seed, _CLEAN, b), self.device)
        if primary.randomized or not self.masking_checks:
            clean_prediction = primary.predict(x)
        else:
            # One pass gives the clean predictions and the input gradients of the gradient-masking check.
            clean_prediction, flags = sanity.predict_with_gradient_check(primary, x, y)
            masked[self.variants[0]] = flags.tolist()
        correct = clean_prediction == y
        for v, mode in enumerate(self.variants):
            if mode in masked or not self.masking_checks:
                continue
            seed_torch(derive_seed(self.seed, _GRADIENT, b, v), self.device)
            flags = torch.zeros(x.shape[0], dtype=torch.bool, device=self.device)
            flags[correct] = sanity.gradient_masked(pipelines[mode], x[correct], y[correct])
            masked[mode] = flags.tolist()
        return clean_prediction, masked

    def _skipped(self, pipeline: DeployedPipeline) -> set[str]:
        built = build_attack(self.spec, pipeline, pipeline, norm=self.norm, eps=self.eps[0],
                             num_classes=self.model.num_classes, device=self.device, eot=self.eot, steps=self.steps,
                             step_size=self.step_size)
        notes = {f"skipped {s}" for s in built.skipped}
        targeted = {"apgd-t", "fab-t"} & ({self.spec.name} | set(self.spec.members))
        if targeted and self.model.num_classes - 1 < AUTOATTACK_TARGETS:
            notes.add(f"{', '.join(sorted(targeted))}: {self.model.num_classes - 1} target class(es) instead of "
                      f"{AUTOATTACK_TARGETS} (the model has {self.model.num_classes} classes)")
        return notes

    def _postfix(self, bar: Any, e: int, robust_done: list[int] | None, correct: Tensor, broken: Tensor,
                 left: int) -> None:
        seen = bar.n + correct.shape[0]
        robust = (robust_done[e] if robust_done else 0) + int((correct & ~broken).sum())
        bar.set_postfix(left=left, robust=f"{robust / max(seen, 1):.1%}")

    def _expected(self, pipeline: DeployedPipeline) -> torch.nn.Module:
        return Expectation(pipeline, self.eot) if pipeline.randomized and self.eot > 1 else pipeline

    # --- checks and summary -------------------------------------------------------------------------
    def _checks(self, pipelines: dict[str, DeployedPipeline], records: list[dict[str, Any]],
                notes: set[str], progress: bool = False) -> tuple[list[sanity.Check], dict[str, Any] | None]:
        primary = pipelines[self.variants[0]]
        checks: list[sanity.Check] = []
        first = slice(0, min(self.n, self.batch_size, CHECK_POINTS))
        x = self.x[first].to(self.device)
        y = self.y[first].to(self.device)
        seed_torch(derive_seed(self.seed, _CHECKS), self.device)
        correct = [r for r in records if r["correct"]]
        if self.masking_checks:
            checks += sanity.autoattack_checks(primary, x, y, randomized=primary.randomized, eot=self.eot,
                                               adaptive_denoise=self.defense.kind == "denoise")
            for mode in self.variants:
                masked = sum(1 for r in correct if r["gradient_masked"][mode])
                checks.append(sanity.zero_gradient_check(masked, len(correct), mode))
        else:
            checks += sanity.masking_checks_disabled(primary.randomized, self.eot, self.variants)
        order = self._component_order()
        # Robust accuracy after each member, in the order they ran (per gradient variant), as AutoAttack tracks it.
        accuracy_after: dict[str, dict[str, float]] = {}
        broken_by: dict[float, dict[str, int]] = {}
        for e, eps in enumerate(self.eps):
            counts = Counter(r["results"][e]["attack"] for r in correct if r["results"][e]["broken"])
            broken_by[eps] = dict(counts)
            remaining = len(correct)
            for mode in self.variants:
                key = f"eps={eps:g}" + (f" [{mode}]" if len(self.variants) > 1 else "")
                accs = {"clean": remaining / self.n}
                for label in order:
                    if len(self.variants) > 1 and not label.endswith(f"[{mode}]"):
                        continue
                    remaining -= counts.get(label, 0)
                    accs[label.split("[")[0]] = remaining / self.n
                accuracy_after[key] = accs
        checks.append(sanity.square_check(accuracy_after) if self.spec.name == "autoattack"
                      else sanity.Check("square-beats-white-box", "n/a", "applies to the AutoAttack standard suite"))
        black = {label for label in order if label.split("[")[0] == "square"}
        white = set(order) - black
        checks.append(sanity.black_box_check(broken_by, black, white))
        large = None
        if self.large_eps_check:
            large = self._large_eps(pipelines, notes, progress)
            checks.append(sanity.large_eps_check(large["robust"], large["n"], large["eps"], self.norm))
        else:
            checks.append(sanity.Check("large-eps", "n/a", "disabled"))
        return checks, large

    def _component_order(self) -> list[str]:
        members = list(self.spec.members) if self.spec.is_suite else [self.spec.name]
        if len(self.variants) == 1:
            return members
        return [f"{m}[{mode}]" for mode in self.variants for m in members]

    def _large_eps(self, pipelines: dict[str, DeployedPipeline], notes: set[str],
                   progress: bool = False) -> dict[str, Any]:
        """The attack once more at a very large ε on the first points (a gradient-masking check)."""
        eps = sanity.large_eps(self.norm, tuple(self.x.shape[1:]))
        subset = min(self.n, LARGE_EPS_SUBSET)
        robust = 0
        bar = _progress_bar(subset, progress, initial=0)
        for start in range(0, subset, self.batch_size):
            stop = min(subset, start + self.batch_size)
            outcome = self._attack_batch(pipelines, _LARGE_EPS_BATCH_OFFSET + start // self.batch_size,
                                         self.x[start:stop], self.y[start:stop], start, [eps], bar=bar)
            notes |= outcome.notes
            robust += sum(1 for r in outcome.records if r["correct"] and not r["results"][0]["broken"])
            bar.update(stop - start)
        bar.close()
        return {"eps": eps, "n": subset, "robust": robust, "robust_accuracy": robust / subset}

    def _result(self, records: list[dict[str, Any]], checks: list[sanity.Check], large: dict[str, Any] | None,
                notes: list[str], seconds: float) -> AttackResult:
        from statsmodels.stats.proportion import proportion_confint

        n = len(records)
        correct = [r for r in records if r["correct"]]
        curve = []
        for e, eps in enumerate(self.eps):
            robust = sum(1 for r in correct if not r["results"][e]["broken"])
            low, high = proportion_confint(robust, n, alpha=0.05, method="beta")
            broken_by = Counter(r["results"][e]["attack"] for r in correct if r["results"][e]["broken"])
            rejected = sum(r["results"][e]["rejected"] for r in records)
            curve.append(CurvePoint(eps, robust / n, float(low), float(high), dict(sorted(broken_by.items())),
                                    robust=robust, rejected=rejected))
        return AttackResult(
            model=self.config["model"], dataset=self.config["dataset"], n=n, attack=self.spec.name, norm=self.norm,
            defense=str(self.defense), clean_accuracy=len(correct) / n, curve=curve, flags=sanity.flags_of(checks),
            seconds=seconds, gradient=self.gradient, eot=self.eot, seed=self.seed, batch_size=self.batch_size,
            checks=[c.as_dict() for c in checks], large_eps=large, notes=notes,
        )

    def _finished(self, run_dir: Any, records: list[dict[str, Any]]) -> AttackResult | None:
        """The result of a run directory that is already complete (None when its files are not all there)."""
        files = {eps: run_dir.artifact(adversarial_file_name(eps)) for eps in self.eps}
        if not all(p.exists() for p in files.values()):
            return None
        try:
            result = AttackResult.from_summary(read_json_file(run_dir.artifact(SUMMARY_FILE), "recomputing it"))
        except (RunFileDamaged, KeyError, TypeError, ValueError) as error:
            # The records and adversarial examples are intact: the figures follow from them again (as certify does).
            logger.warning("%s; its records are complete, so the summary is computed again",
                           error if isinstance(error, RunFileDamaged) else f"{SUMMARY_FILE} is incomplete ({error})")
            return None
        result.records = sorted(records, key=lambda r: r["index"])
        result.adversarial = {eps: torch.load(p, map_location="cpu", weights_only=True) for eps, p in files.items()}
        result.run_dir = run_dir.path
        return result

    # --- shards -------------------------------------------------------------------------------------
    def _load_shard(self, run_dir: Any, b: int, start: int, stop: int) -> list[Tensor]:
        shard = run_dir.artifact(_shard_name(b))
        if shard.exists():
            tensors = torch.load(shard, map_location="cpu", weights_only=True)
            return [tensors[e] for e in range(len(self.eps))]
        merged = [run_dir.artifact(adversarial_file_name(eps)) for eps in self.eps]
        if all(p.exists() for p in merged):
            return [torch.load(p, map_location="cpu", weights_only=True)[start:stop] for p in merged]
        raise ValueError(f"{run_dir.path} records batch {b} as complete but its adversarial examples are missing; "
                         f"re-run with --no-resume")


def adversarial_file_name(eps: float) -> str:
    """`adversarial_eps<ε>.pt`: all N points (the clean image where not broken), RobustBench's external format."""
    return f"adversarial_eps{eps:.6g}.pt"


def _shard_name(batch: int) -> str:
    return f"shard_batch{batch:05d}.pt"


def _save_atomically(path: Path, obj: Any) -> None:
    """torch.save `obj` (tensors, plain lists, dicts and strings: loadable with weights_only=True) atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _partial_name(batch: int) -> str:
    return f"partial_batch{batch:05d}.pt"


def _load_partial(path: Path, size: int, n_eps: int) -> dict[str, Any] | None:
    """A batch's saved state, or None (start the batch afresh) when there is none or it does not fit."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        fits = (state["adv"].shape[0] == size and len(state["per_eps"]) == size
                and 0 < len(state["adversarial"]) < n_eps)
    except Exception as error:  # an unreadable file only costs the work it held
        logger.warning("ignoring %s (%s); the batch starts afresh", path, error)
        return None
    if not fits:
        logger.warning("ignoring %s: it does not match this batch; the batch starts afresh", path)
        return None
    return state


def _fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's weights, so a run directory is never resumed with other weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


class _NullBar:
    n = 0

    def update(self, k: int) -> None:
        self.n += k

    def set_description(self, text: str) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool, initial: int) -> Any:
    if not enabled:
        bar = _NullBar()
        bar.n = initial
        return bar
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="pt", dynamic_ncols=True, leave=False)


@contextlib.contextmanager
def _autoattack_log_captured() -> Iterator[None]:
    """Route pyautoattack's logger to debug level: its warnings are re-checked and reported as flags."""
    aa_logger = logging.getLogger("auto-attack")
    previous = aa_logger.propagate, aa_logger.level
    handler = _DebugRelay()
    aa_logger.addHandler(handler)
    aa_logger.propagate = False
    try:
        yield
    finally:
        aa_logger.removeHandler(handler)
        aa_logger.propagate, _ = previous


class _DebugRelay(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        logger.debug("pyautoattack: %s", record.getMessage())


# --- resolving the user's request -----------------------------------------------------------------
def _resolve_data(dataset_or_xy: Any, n: int | None, data_dir: str | Path | None = None) -> tuple[str, Tensor, Tensor]:
    from robusteval.data import load_dataset

    if isinstance(dataset_or_xy, (str, Path)):
        data = load_dataset(str(dataset_or_xy), "test", root=data_dir)
        name, x, y = data.name, data.x, data.y
    elif isinstance(dataset_or_xy, ImageDataset):
        name, x, y = dataset_or_xy.name, dataset_or_xy.x, dataset_or_xy.y
    elif isinstance(dataset_or_xy, (tuple, list)) and len(dataset_or_xy) == 2:
        x, y = dataset_or_xy
        name = "custom"
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError("dataset_or_xy as a pair must be two tensors (x, y)")
    else:
        raise TypeError(f"dataset_or_xy must be a data set name, an ImageDataset or a pair (x, y), "
                        f"got {type(dataset_or_xy).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be a (N, C, H, W) batch of images, got shape {tuple(x.shape)}")
    validate_images(x, tuple(x.shape[1:]), what="x")
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise ValueError(f"y must be {x.shape[0]} integer labels, got shape {tuple(y.shape)} and dtype {y.dtype}")
    if n is not None:
        if n < 1 or n > x.shape[0]:
            raise ValueError(f"n must be between 1 and the {x.shape[0]} points of the data set, got {n}")
        x, y = x[:n], y[:n]
    return name, x.detach().to(torch.float32).cpu(), y.detach().to(torch.long).cpu()


def prepare_attack(
    model: JointModel | str,
    dataset_or_xy: Any = "digits",
    *,
    attack: str = "autoattack",
    norm: str = "Linf",
    eps: Sequence[float] | float | None = None,
    n: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "auto",
    defense: str = "none",
    gradient: str | None = None,
    eot: int | None = None,
    steps: int | None = None,
    step_size: float | None = None,
    seed: int = 0,
    large_eps_check: bool = True,
    masking_checks: bool = True,
    checkpoint: str | Path | None = None,
    model_dir: str | Path | None = None,
    allow_unsafe_pickle: bool = False,
    data_dir: str | Path | None = None,
) -> AttackJob:
    """Resolve and validate an attack evaluation without running it (see `evaluate_attack`)."""
    from robusteval.model_zoo.registry import create_model, resolve_device

    spec = resolve_attack(attack)
    norm = resolve_norm(norm)
    check_norm(spec, norm)
    target = resolve_device(device)
    dataset_name, x, y = _resolve_data(dataset_or_xy, n, data_dir)
    if isinstance(model, str):
        model_name = model
        model = create_model(model, dataset=dataset_name, device=target, checkpoint=checkpoint, model_dir=model_dir,
                             threat_model=norm, allow_unsafe_pickle=allow_unsafe_pickle)
    elif isinstance(model, JointModel):
        model_name = model.name
        model = model.to(target)
    else:
        raise TypeError(f"model must be a JointModel (use robusteval.wrap for a plain nn.Module) or a registered "
                        f"name, got {type(model).__name__}")
    check_data_fits_model(model_name, model.input_shape, model.num_classes, x, y, data_name=f"data set '{dataset_name}'")
    if eps is None:
        eps_list = list(default_eps(dataset_name, norm))
    else:
        eps_list = [float(eps)] if isinstance(eps, (int, float)) else [float(e) for e in eps]
    if not eps_list or any(not math.isfinite(e) or e < 0 for e in eps_list):
        raise ValueError(f"eps must be a non-empty list of finite values >= 0, got {eps_list}")
    eps_list = sorted(set(eps_list))
    check_eps_budget(norm, eps_list, model.input_shape)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be a positive number, got {step_size}")

    parsed = parse_defense(defense)
    # Here, not when the run starts: a rejected job must not leave a run directory behind.
    require_defense_capabilities(model, parsed)
    if gradient is not None and gradient not in GRADIENT_MODES:
        raise ValueError(f"gradient must be one of {', '.join(GRADIENT_MODES)}, got {gradient!r}")
    if gradient is not None and parsed.kind != "denoise":
        # Without a denoiser there is nothing to take gradients through: any choice would be silently ignored.
        raise ValueError(f"--gradient {gradient} applies to denoise defenses only (the defense is '{parsed}')")
    if gradient is None:
        gradient = "auto" if parsed.kind == "denoise" else "full"
    randomized = parsed.randomized or bool(getattr(model, "stochastic_inference", False))
    if eot is None:
        if spec.eot_default is not None and (spec.name == "autoattack-rand" or not randomized):
            eot = spec.eot_default
        else:
            eot = DEFAULT_EOT if randomized else 1
    if eot < 1:
        raise ValueError(f"eot must be >= 1, got {eot}")
    return AttackJob(model, x, y, model_name=model_name, dataset_name=dataset_name, spec=spec, norm=norm,
                     eps=eps_list, defense=str(parsed), gradient=gradient, eot=int(eot), steps=steps,
                     step_size=step_size, seed=int(seed), batch_size=int(batch_size), device=target,
                     large_eps_check=large_eps_check, checkpoint=str(checkpoint) if checkpoint is not None else None,
                     masking_checks=masking_checks)


def evaluate_attack(
    model: JointModel | str,
    dataset_or_xy: Any = "digits",
    *,
    attack: str = "autoattack",
    norm: str = "Linf",
    eps: Sequence[float] | float | None = None,
    n: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "auto",
    defense: str = "none",
    gradient: str | None = None,
    eot: int | None = None,
    steps: int | None = None,
    step_size: float | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = True,
    progress: bool = False,
    large_eps_check: bool = True,
    masking_checks: bool = True,
    data_dir: str | Path | None = None,
) -> AttackResult:
    """Adversarial robust accuracy of `model` (with its `defense` in the loop) over an ε list.

    `model`: a JointModel (see `robusteval.wrap`; it is moved to `device`) or a registered name.
    `dataset_or_xy`: a data set name, an ImageDataset, or a pair (x, y) of
    [0, 1] images (N, C, H, W) and integer labels; the first `n` points are used.
    `attack`: a name from `robusteval list attacks`; `norm`: 'Linf' or 'L2';
    `eps`: the radii (default: the data set's grid). `defense`: 'none',
    'denoise:S', 'denoise:S:noise', 'noise:S' or 'smooth:S:K'; `gradient`:
    'full', 'bpda' or 'auto' (both) for denoise defenses; `eot`: noise draws
    per gradient against randomized defenses (default 20 there, else 1).
    `out`: a run directory (config.json, samples.jsonl, adversarial_eps<ε>.pt,
    summary.json), resumed when it holds the same configuration; None keeps
    everything in memory. `large_eps_check` re-runs the attack at a very large ε
    on up to 100 points (a gradient-masking check); `masking_checks=False`
    skips AutoAttack's randomness/softmax/dynamic checks and the zero-gradient
    check (an extra gradient pass at the clean points; for timing against a
    bare attack). Returns the figures of
    summary.json, with the per-point records and adversarial examples.
    """
    job = prepare_attack(model, dataset_or_xy, attack=attack, norm=norm, eps=eps, n=n, batch_size=batch_size,
                         device=device, defense=defense, gradient=gradient, eot=eot, steps=steps,
                         step_size=step_size, seed=seed, large_eps_check=large_eps_check,
                         masking_checks=masking_checks, data_dir=data_dir)
    return job.run(out=out, resume=resume, progress=progress)
