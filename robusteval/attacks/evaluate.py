"""Resolving an attack evaluation: the caller's settings, checked and completed, into a prepared `AttackJob`.

`evaluate_attack` is the Python entry point; `robusteval run` calls the same
`prepare_attack`. Model, weights, data and device are resolved like every
evaluation's (`robusteval.jobs`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from robusteval.attacks.catalog import (
    AttackSpec,
    check_norm,
    resolve_attack,
    resolve_norm,
)
from robusteval.attacks.defenses import DECISION_DRAWS, require_defense_capabilities
from robusteval.attacks.engine import AttackJob
from robusteval.attacks.results import AttackResult
from robusteval.core.errors import UsageError
from robusteval.core.interface import JointModel
from robusteval.core.preflight import check_eps_budget
from robusteval.core.vocabulary import GRADIENTS, DefenseSpec, parse_defense
from robusteval.data import default_eps
from robusteval.jobs import JobOptions, resolve, split_keywords

# Small images attack fastest in large batches (per-call overhead, Square's 5,000 queries per batch);
# the state is saved after every ε of a batch, so a large batch loses little work to a kill.
DEFAULT_BATCH_SIZE = 500
DEFAULT_EOT = 20

@dataclass(frozen=True)
class AttackSettings:
    """What an attack evaluation computes, as the caller asked for it (defaults resolved by `prepare_attack`)."""

    attack: str = "autoattack"
    norm: str = "Linf"
    eps: Sequence[float] | float | None = None
    n: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    defense: str = "none"
    gradient: str | None = None
    eot: int | None = None
    steps: int | None = None
    step_size: float | None = None
    seed: int = 0
    large_eps_check: bool = True
    masking_checks: bool = True
    decision_draws: int = DECISION_DRAWS


def prepare_attack(model: JointModel | str, dataset: Any = "digits", **keywords: Any) -> AttackJob:
    """Resolve and validate an attack evaluation without running it (keywords: see `evaluate_attack`)."""
    settings, options = split_keywords(keywords, AttackSettings)
    settings = AttackSettings(**settings)
    spec = resolve_attack(settings.attack)
    norm = resolve_norm(settings.norm)
    check_norm(spec, norm)
    # Only the images the run needs are read (ImageNet decodes them one by one).
    limit = settings.n if settings.n is not None and settings.n >= 1 else None
    parsed = parse_defense(settings.defense)
    resolved = resolve(model, JobOptions.of(dataset, options), threat_model=norm, limit=limit, shardable=True,
                       uses_denoiser=parsed.uses_denoiser)
    x, y = resolved.data.x, resolved.data.y
    if settings.n is not None:
        if settings.n < 1 or settings.n > x.shape[0]:
            raise UsageError(f"n must be between 1 and the {x.shape[0]} points of the data set, got {settings.n}")
        x, y = x[: settings.n], y[: settings.n]
    eps_list = _eps_list(settings.eps, resolved.data.name, norm)
    check_eps_budget(norm, eps_list, resolved.model.input_shape)
    _check_counts(settings)
    # Here, not when the run starts: a rejected job must not leave a run directory behind.
    require_defense_capabilities(resolved.model, parsed)
    gradient = _gradient(settings.gradient, parsed)
    randomized = parsed.randomized or bool(getattr(resolved.model, "stochastic_inference", False))
    eot = _eot(settings.eot, spec, randomized)
    checkpoint = resolved.options.checkpoint
    return AttackJob(resolved.model, x.detach().to(torch.float32).cpu(), y.detach().to(torch.long).cpu(),
                     model_name=resolved.model_name, dataset_name=resolved.data.name, spec=spec, norm=norm,
                     eps=eps_list, defense=str(parsed), gradient=gradient, eot=eot, steps=settings.steps,
                     step_size=settings.step_size, seed=int(settings.seed), batch_size=int(settings.batch_size),
                     device=resolved.device, large_eps_check=settings.large_eps_check,
                     checkpoint=str(checkpoint) if checkpoint is not None else None,
                     masking_checks=settings.masking_checks, companions={**resolved.options.official_files(), **resolved.denoiser_config},
                     shard=resolved.options.shard, decision_draws=int(settings.decision_draws))


def _eps_list(eps: Sequence[float] | float | None, dataset: str, norm: str) -> list[float]:
    if eps is None:
        eps_list = list(default_eps(dataset, norm))
    else:
        eps_list = [float(eps)] if isinstance(eps, (int, float)) else [float(e) for e in eps]
    if not eps_list or any(not math.isfinite(e) or e < 0 for e in eps_list):
        raise UsageError(f"eps must be a non-empty list of finite values >= 0, got {eps_list}")
    return sorted(set(eps_list))


def _check_counts(settings: AttackSettings) -> None:
    if settings.batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {settings.batch_size}")
    if settings.steps is not None and settings.steps < 1:
        raise UsageError(f"steps must be >= 1, got {settings.steps}")
    if settings.decision_draws < 1:
        raise UsageError(f"decision_draws must be >= 1, got {settings.decision_draws}")
    if settings.step_size is not None and not (math.isfinite(settings.step_size) and settings.step_size > 0):
        raise UsageError(f"step_size must be a positive number, got {settings.step_size}")


def _gradient(gradient: str | None, defense: DefenseSpec) -> str:
    if gradient is None:
        return "auto" if defense.differentiates_through else "full"
    if gradient not in GRADIENTS:
        raise UsageError(f"gradient must be one of {', '.join(GRADIENTS)}, got {gradient!r}")
    if not defense.differentiates_through:
        # Without a denoiser or a chain there is nothing to take gradients through: any choice would be ignored.
        raise UsageError(f"--gradient {gradient} applies to denoise and sgld defenses only (the defense is "
                         f"'{defense}')")
    return gradient


def _eot(eot: int | None, spec: AttackSpec, randomized: bool) -> int:
    if eot is None:
        if spec.eot_default is not None and (spec.name == "autoattack-rand" or not randomized):
            eot = spec.eot_default
        else:
            eot = DEFAULT_EOT if randomized else 1
    if eot < 1:
        raise UsageError(f"eot must be >= 1, got {eot}")
    return int(eot)


def evaluate_attack(model: JointModel | str, dataset: Any = "digits", *, out: str | Path | None = None,
                    resume: bool = True, progress: bool = False, **keywords: Any) -> AttackResult:
    """Adversarial robust accuracy of `model` (with its `defense` in the loop) over an ε list.

    `model`: a JointModel (see `robusteval.wrap`) or a registered name.
    `dataset`: a data set name, an .npz path, an ImageDataset, or a pair (x, y) of
    [0, 1] images (N, C, H, W) and integer labels; the first `n` points are used.
    Keywords: the `AttackSettings` and the `robusteval.jobs.JobOptions` (data_dir,
    checkpoint, model_dir, allow_unsafe_pickle, vae, model_config, device) of every evaluation;
    `denoiser` (a registered name or a JointModel, with `denoiser_checkpoint`) puts that model's denoiser in
    front of `model`'s classifier in a denoise defense (robusteval.model_zoo.paired).
    `attack`: a name from `robusteval list attacks`; `norm`: 'Linf' or 'L2';
    `eps`: the radii (default: the data set's grid). `defense`: 'none',
    'denoise:S', 'denoise:S:noise', 'noise:S', 'smooth:S:K' or
    'sgld:K[:step:noise:chains]' (JEM's SGLD refinement, models with an
    energy); `gradient`: 'full', 'bpda' or 'auto' (both, worst case per point)
    for denoise and sgld defenses; `eot`: noise draws per gradient against
    randomized defenses (default 20 there, else 1); `decision_draws`: fresh
    draws of a randomized pipeline's decision (majority vote, and worst-of-N:
    fooled on any one).
    `out`: a run directory (config.json, samples.jsonl, adversarial_eps<ε>.pt,
    summary.json), resumed when it holds the same configuration; None keeps
    everything in memory. `large_eps_check` re-runs the attack at a very large ε
    on up to 100 points (a gradient-masking check); `masking_checks=False`
    skips AutoAttack's randomness/softmax/dynamic checks and the zero-gradient
    check (an extra gradient pass at the clean points; for timing against a
    bare attack). Returns the figures of
    summary.json, with the per-point records and adversarial examples.
    """
    return prepare_attack(model, dataset, **keywords).run(out=out, resume=resume, progress=progress)
