"""Resolving an attack evaluation: the caller's settings, checked and completed, into a prepared `AttackJob`.

`evaluate_attack` is the Python entry point; `robusteval run` calls the same
`prepare_attack`. Model, weights, data and device are resolved like every
evaluation's (`robusteval.jobs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from robusteval.attacks.catalog import check_norm, resolve_attack, resolve_norm
from robusteval.attacks.defenses import require_defense_capabilities
from robusteval.attacks.engine import AttackJob
from robusteval.attacks.results import AttackResult
from robusteval.attacks.settings import (
    AttackSettings,
    ResolvedAttackSettings,
    check_counts,
    eps_list,
    resolve_eot,
    resolve_gradient,
)
from robusteval.core.errors import UsageError
from robusteval.core.interface import JointModel
from robusteval.core.preflight import check_eps_budget
from robusteval.core.vocabulary import parse_defense
from robusteval.data import default_eps
from robusteval.jobs import (
    JobOptions,
    Resolved,
    resolve,
    shows_keywords,
    split_keywords,
)


@shows_keywords(AttackSettings)
def prepare_attack(model: JointModel | str, dataset: Any = "digits", **keywords: Any) -> AttackJob:
    """Resolve and validate an attack evaluation without running it (keywords: see `evaluate_attack`)."""
    own, options = split_keywords(keywords, AttackSettings)
    settings = AttackSettings(**own)
    spec = resolve_attack(settings.attack)
    norm = resolve_norm(settings.norm)
    check_norm(spec, norm)
    # Only the images the run needs are read (ImageNet decodes them one by one).
    limit = settings.n if settings.n is not None and settings.n >= 1 else None
    resolved = resolve(model, JobOptions.of(dataset, options), threat_model=norm, limit=limit, shardable=True,
                       uses_denoiser=parse_defense(settings.defense).uses_denoiser)
    return AttackJob(resolved, resolve_settings(settings, resolved))


def resolve_settings(settings: AttackSettings, resolved: Resolved) -> ResolvedAttackSettings:
    """The caller's settings completed and checked against the resolved model and data.

    Raises UsageError (CapabilityError for a defense the model cannot run) before any run directory exists.
    """
    spec, norm = resolve_attack(settings.attack), resolve_norm(settings.norm)
    available = resolved.data.x.shape[0]
    if settings.n is not None and (settings.n < 1 or settings.n > available):
        raise UsageError(f"n must be between 1 and the {available} points of the data set, got {settings.n}")
    radii = eps_list(default_eps(resolved.data.name, norm) if settings.eps is None else settings.eps)
    check_eps_budget(norm, radii, resolved.model.input_shape)
    check_counts(settings)
    defense = parse_defense(settings.defense)
    # Here, not when the run starts: a rejected job must not leave a run directory behind.
    require_defense_capabilities(resolved.model, defense)
    gradient = resolve_gradient(settings.gradient, defense)
    randomized = defense.randomized or bool(getattr(resolved.model, "stochastic_inference", False))
    return ResolvedAttackSettings(
        spec=spec, norm=norm, eps=tuple(radii), n=available if settings.n is None else settings.n,
        batch_size=int(settings.batch_size), defense=defense, gradient=gradient,
        eot=resolve_eot(settings.eot, spec, randomized), steps=settings.steps, step_size=settings.step_size,
        seed=int(settings.seed), large_eps_check=settings.large_eps_check, masking_checks=settings.masking_checks,
        decision_draws=int(settings.decision_draws))


@shows_keywords(AttackSettings)
def evaluate_attack(model: JointModel | str, dataset: Any = "digits", *, out: str | Path | None = None,
                    resume: bool = True, progress: bool = False, **keywords: Any) -> AttackResult:
    """Adversarial robust accuracy of `model` (with its `defense` in the loop) over an ε list.

    `model`: a JointModel (see `robusteval.wrap`) or a registered name.
    `dataset`: a data set name, an .npz path, an ImageDataset, or a pair (x, y) of
    [0, 1] images (N, C, H, W) and integer labels; the first `n` points are used.
    Keywords: the `AttackSettings` and the `robusteval.jobs.JobOptions` of every
    evaluation (all listed at the end, with their defaults); `denoiser` (a
    registered name or a JointModel, with `denoiser_checkpoint`) puts that model's
    denoiser in front of `model`'s classifier in a denoise or purify defense
    (robusteval.model_zoo.paired).
    `attack`: a name from `robusteval list attacks`; `norm`: 'Linf' or 'L2';
    `eps`: the radii (default: the data set's grid). `defense`: 'none',
    'denoise:S', 'denoise:S:noise', 'noise:S', 'smooth:S:K',
    'sgld:K[:step:noise:chains[:start]]' (JEM's SGLD refinement, models with an
    energy) or 'purify:S:K[:ddpm|ddim]' (K reverse steps of the model's
    denoiser from noise std S); `gradient`: 'full', 'bpda', 'surrogate:K''
    (purify: the gradient of a K'-step purification) or 'auto' (all of
    them, worst case per point) for denoise, purify and sgld defenses; `eot`: noise draws per gradient against
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
