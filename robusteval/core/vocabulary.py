"""The words robusteval's options and run files use, each defined once.

Norms, gradient modes, smoothing modes and kinds, run kinds, report formats
and the grammar of a deployed defense (`--defense`). The command line's
choices and help texts, the engines' checks and the reports' contracts all
read them from here. Per-data-set budgets (ε grids, headline ε, radii) live
on the data set's description (`robusteval.data.Budgets`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from robusteval.core.errors import UsageError
from robusteval.core.names import resolve_name

# Threat models, in the order tables and figures show them (pixel scale [0, 1]).
NORMS = ("Linf", "L2", "L1")
NORM_SYMBOL = {"Linf": "L∞", "L2": "L2", "L1": "L1"}
# Gradients through a denoise, purify or sgld defense: exact, identity backward (BPDA), a K'-step surrogate
# process (purify only; Lee & Kim 2023), or the worst case over them per point (auto).
GRADIENTS = ("full", "bpda", "auto")
GRADIENT_FORMS = ("full", "bpda", "surrogate:K'", "auto")
# The surrogate `auto` adds against purify:S:K with K > 1: one step, the one-shot denoiser from the same start.
AUTO_SURROGATE_STEPS = 1
# Samplers of purify:S:K[:sampler] (robusteval.attacks.purification); the first is the default (DiffPure's).
PURIFY_SAMPLERS = ("ddpm", "ddim")
# Randomized smoothing: which base classifier is smoothed, and which of Cohen et al.'s algorithms runs.
SMOOTHING_MODES = ("direct", "denoised")
SMOOTHING_KINDS = ("certify", "predict")
# Certification methods: cohen (CERTIFY with n estimation draws), sequential (draws until every radius of a
# grid is decided, at most n_max; robusteval.smoothing.sequential).
CERTIFY_METHODS = ("cohen", "sequential")
# The kinds of run directories (summary.json "kind").
RUN_KINDS = ("attack", "certify", "predict", "denoise")
# Formats of `robusteval report`.
REPORT_FORMATS = ("html", "md", "csv", "latex", "robustbench")

DEFENSE_KINDS = ("none", "denoise", "noise", "smooth", "sgld", "purify")
DEFENSE_FORMS = ("none", "denoise:S", "denoise:S:noise", "noise:S", "smooth:S:K",
                 "sgld:K[:step:noise:chains[:start]]", "purify:S:K[:ddpm|ddim]")
_DEFENSE_USAGE = (f"expected one of {', '.join(DEFENSE_FORMS)} (S > 0 a noise std, K >= 1 votes or purification "
                  f"steps, K >= 0 SGLD steps)")
# JEM's SGLD refinement (wgrathwohl/JEM attack_model.py, `refined_logits`), converted from its [-1, 1] pixel scale
# to the contract's [0, 1]: with u = 2x - 1, ∇ᵤ = ∇ₓ / 2, so a step u += ∇ᵤ logsumexp f + 0.01 n is
# x += (1/4) ∇ₓ logsumexp f + 0.005 n, and the starting noise std 0.03 on u is 0.015 on x.
SGLD_STEP = 0.25
SGLD_NOISE = 0.005
SGLD_START_NOISE = 0.015
SGLD_CHAINS = 5


def norm_order(norm: str) -> int:
    """Sort key putting norms in the order of NORMS (unknown ones last)."""
    return NORMS.index(norm) if norm in NORMS else len(NORMS)


@dataclass(frozen=True)
class DefenseSpec:
    """A parsed `--defense` string (see robusteval.attacks.defenses for what each one does)."""

    kind: str
    sigma: float = 0.0
    votes: int = 0  # smooth: K
    add_noise: bool = False  # denoise: add N(0, S²) before denoising
    steps: int = 0  # sgld: K
    step_size: float = SGLD_STEP  # sgld: α of x ← x − α ∇ₓE(x) + s·n, [0, 1] pixel units
    noise: float = SGLD_NOISE  # sgld: s
    chains: int = SGLD_CHAINS  # sgld: independent chains whose logits are averaged
    sampler: str = PURIFY_SAMPLERS[0]  # purify: ddpm (ancestral) or ddim (η = 0); steps is its K
    start_noise: float = SGLD_START_NOISE  # sgld: std of the Gaussian noise each chain starts with

    @property
    def randomized(self) -> bool:
        if self.kind == "sgld":  # JEM's L2 recipe starts without noise; a chain without noise is deterministic
            return self.start_noise > 0 or (self.steps > 0 and self.noise > 0)
        return self.kind in ("noise", "smooth", "purify") or (self.kind == "denoise" and self.add_noise)

    @property
    def differentiates_through(self) -> bool:
        """The defense computes gradients in its forward pass (a denoiser's score, SGLD): --gradient applies."""
        return self.kind in ("denoise", "purify") or (self.kind == "sgld" and self.steps > 0)

    @property
    def uses_denoiser(self) -> bool:
        """The defense purifies with the model's denoiser, so `--denoiser` can put another model's there."""
        return self.kind in ("denoise", "purify")

    @property
    def forward_passes(self) -> int:
        """Network passes per prediction of the deployed pipeline (one draw of a randomized one)."""
        if self.kind == "denoise":
            return 2
        if self.kind == "sgld":
            return self.chains * (2 * self.steps + 1)
        if self.kind == "purify":
            return self.steps + 1
        return self.votes if self.kind == "smooth" else 1

    def __str__(self) -> str:
        if self.kind == "none":
            return "none"
        if self.kind == "sgld":
            start = f":{self.start_noise:g}" if self.start_noise != SGLD_START_NOISE else ""
            if (self.step_size, self.noise, self.chains) == (SGLD_STEP, SGLD_NOISE, SGLD_CHAINS) and not start:
                return f"sgld:{self.steps}"
            return f"sgld:{self.steps}:{self.step_size:g}:{self.noise:g}:{self.chains}{start}"
        if self.kind == "smooth":
            return f"smooth:{self.sigma:g}:{self.votes}"
        if self.kind == "purify":
            sampler = "" if self.sampler == PURIFY_SAMPLERS[0] else f":{self.sampler}"
            return f"purify:{self.sigma:g}:{self.steps}{sampler}"
        if self.kind == "denoise" and self.add_noise:
            return f"denoise:{self.sigma:g}:noise"
        return f"{self.kind}:{self.sigma:g}"


def parse_defense(text: str) -> DefenseSpec:
    """Parse 'none', 'denoise:S', 'denoise:S:noise', 'noise:S', 'smooth:S:K',
    'sgld:K[:step:noise:chains[:start]]' or 'purify:S:K[:sampler]'."""
    parts = [p.strip() for p in str(text).split(":")]
    kind = resolve_name(parts[0], DEFENSE_KINDS, "defense")
    usage = _DEFENSE_USAGE
    if kind == "none":
        if len(parts) != 1:
            raise UsageError(f"defense 'none' takes no parameters, got {text!r}; {usage}")
        return DefenseSpec("none")
    if kind == "sgld":
        return _parse_sgld(text, parts[1:])
    if len(parts) < 2:
        raise UsageError(f"defense {text!r} needs a noise level S; {usage}")
    try:
        sigma = float(parts[1])
    except ValueError:
        raise UsageError(f"defense {text!r}: S must be a number, got {parts[1]!r}; {usage}") from None
    if not math.isfinite(sigma) or sigma <= 0:
        raise UsageError(f"defense {text!r}: S must be a positive noise std, got {sigma}; {usage}")
    if kind == "smooth":
        if len(parts) != 3 or not parts[2].isdigit() or int(parts[2]) < 1:
            raise UsageError(f"defense {text!r}: smooth needs a vote count K >= 1 (smooth:S:K); {usage}")
        return DefenseSpec("smooth", sigma, votes=int(parts[2]))
    if kind == "purify":
        return _parse_purify(text, sigma, parts[2:])
    if kind == "denoise" and len(parts) == 3:
        if parts[2].lower() != "noise":
            raise UsageError(f"defense {text!r}: the third part of denoise can only be 'noise'; {usage}")
        return DefenseSpec("denoise", sigma, add_noise=True)
    if len(parts) != 2:
        raise UsageError(f"defense {text!r} has too many parts; {usage}")
    return DefenseSpec(kind, sigma)


def _parse_sgld(text: str, parts: list[str]) -> DefenseSpec:
    """sgld:K[:step:noise:chains[:start]]: K >= 0 steps (0: the start noise only, JEM's n_steps_refine default);
    step > 0, noise >= 0 and start >= 0 (the chains' starting noise) in [0, 1] pixel units; chains >= 1."""
    usage = ("sgld takes sgld:K, sgld:K:step:noise:chains or sgld:K:step:noise:chains:start (K >= 0 steps, step > 0, "
             "noise >= 0 and start >= 0 in [0, 1] pixel units, chains >= 1; JEM's recipe is step "
             f"{SGLD_STEP:g}, noise {SGLD_NOISE:g}, {SGLD_CHAINS} chains, start {SGLD_START_NOISE:g}; its L2 "
             "attack command starts at 0)")
    if len(parts) not in (1, 4, 5):
        raise UsageError(f"defense {text!r}: {usage}")
    try:
        steps = int(parts[0])
        step, noise = (float(parts[1]), float(parts[2])) if len(parts) >= 4 else (SGLD_STEP, SGLD_NOISE)
        chains = int(parts[3]) if len(parts) >= 4 else SGLD_CHAINS
        start = float(parts[4]) if len(parts) == 5 else SGLD_START_NOISE
    except ValueError:
        raise UsageError(f"defense {text!r}: {usage}") from None
    if (steps < 0 or chains < 1 or not (math.isfinite(step) and step > 0) or not (math.isfinite(noise) and noise >= 0)
            or not (math.isfinite(start) and start >= 0)):
        raise UsageError(f"defense {text!r}: {usage}")
    return DefenseSpec("sgld", steps=steps, step_size=step, noise=noise, chains=chains, start_noise=start)


def _parse_purify(text: str, sigma: float, parts: list[str]) -> DefenseSpec:
    """purify:S:K[:sampler]: K >= 1 reverse steps from noise std S; sampler ddpm (default) or ddim."""
    usage = f"purify takes purify:S:K or purify:S:K:sampler (K >= 1 reverse steps, sampler one of " \
            f"{', '.join(PURIFY_SAMPLERS)}; default {PURIFY_SAMPLERS[0]})"
    if len(parts) not in (1, 2) or not parts[0].isdigit() or int(parts[0]) < 1:
        raise UsageError(f"defense {text!r}: {usage}")
    sampler = parts[1].lower() if len(parts) == 2 else PURIFY_SAMPLERS[0]
    if sampler not in PURIFY_SAMPLERS:
        raise UsageError(f"defense {text!r}: unknown sampler {parts[1]!r}; {usage}")
    return DefenseSpec("purify", sigma, steps=int(parts[0]), sampler=sampler)


def parse_gradient(text: str, defense: DefenseSpec) -> str:
    """Validate a --gradient value for `defense`: one of GRADIENT_FORMS; surrogate:K' (K' >= 1) for purify only."""
    value = str(text).strip().lower()
    if value in GRADIENTS:
        return value
    kind, _, steps = value.partition(":")
    if kind != "surrogate":
        raise UsageError(f"--gradient must be one of {', '.join(GRADIENT_FORMS)}, got {text!r}")
    if not steps.isdigit() or int(steps) < 1:
        raise UsageError(f"--gradient {text!r}: surrogate needs a step count K' >= 1 (surrogate:K')")
    if defense.kind != "purify":
        raise UsageError(f"--gradient {text!r}: a surrogate process applies to purify defenses only (the defense "
                         f"is '{defense}')")
    return f"surrogate:{int(steps)}"


def gradient_variants(gradient: str, defense: DefenseSpec) -> list[str]:
    """The gradient modes a run attacks: the one asked for, or for `auto` the ones whose worst case it keeps
    (full and bpda; against purify:S:K with K > 1 also the one-step surrogate)."""
    if gradient != "auto":
        return [gradient]
    if defense.kind == "purify" and defense.steps > AUTO_SURROGATE_STEPS:
        return ["full", "bpda", f"surrogate:{AUTO_SURROGATE_STEPS}"]
    return ["full", "bpda"]
