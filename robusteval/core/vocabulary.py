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
NORMS = ("Linf", "L2")
NORM_SYMBOL = {"Linf": "L∞", "L2": "L2"}
# Gradients through a denoise defense: exact, identity backward (BPDA), or both in turn.
GRADIENTS = ("full", "bpda", "auto")
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

DEFENSE_KINDS = ("none", "denoise", "noise", "smooth", "sgld")
DEFENSE_FORMS = ("none", "denoise:S", "denoise:S:noise", "noise:S", "smooth:S:K", "sgld:K[:step:noise:chains]")
_DEFENSE_USAGE = (f"expected one of {', '.join(DEFENSE_FORMS)} (S > 0 a noise std, K >= 1 votes or SGLD steps)")
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

    @property
    def randomized(self) -> bool:
        return self.kind in ("noise", "smooth", "sgld") or (self.kind == "denoise" and self.add_noise)

    @property
    def differentiates_through(self) -> bool:
        """The defense computes gradients in its forward pass (a denoiser's score, SGLD): --gradient applies."""
        return self.kind in ("denoise", "sgld")

    @property
    def uses_denoiser(self) -> bool:
        """The defense purifies with the model's denoiser, so `--denoiser` can put another model's there."""
        return self.kind == "denoise"

    @property
    def forward_passes(self) -> int:
        """Network passes per prediction of the deployed pipeline (one draw of a randomized one)."""
        if self.kind == "denoise":
            return 2
        if self.kind == "sgld":
            return self.chains * (2 * self.steps + 1)
        return self.votes if self.kind == "smooth" else 1

    def __str__(self) -> str:
        if self.kind == "none":
            return "none"
        if self.kind == "sgld":
            if (self.step_size, self.noise, self.chains) == (SGLD_STEP, SGLD_NOISE, SGLD_CHAINS):
                return f"sgld:{self.steps}"
            return f"sgld:{self.steps}:{self.step_size:g}:{self.noise:g}:{self.chains}"
        if self.kind == "smooth":
            return f"smooth:{self.sigma:g}:{self.votes}"
        if self.kind == "denoise" and self.add_noise:
            return f"denoise:{self.sigma:g}:noise"
        return f"{self.kind}:{self.sigma:g}"


def parse_defense(text: str) -> DefenseSpec:
    """Parse 'none', 'denoise:S', 'denoise:S:noise', 'noise:S', 'smooth:S:K' or 'sgld:K[:step:noise:chains]'."""
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
    if kind == "denoise" and len(parts) == 3:
        if parts[2].lower() != "noise":
            raise UsageError(f"defense {text!r}: the third part of denoise can only be 'noise'; {usage}")
        return DefenseSpec("denoise", sigma, add_noise=True)
    if len(parts) != 2:
        raise UsageError(f"defense {text!r} has too many parts; {usage}")
    return DefenseSpec(kind, sigma)


def _parse_sgld(text: str, parts: list[str]) -> DefenseSpec:
    """sgld:K[:step:noise:chains]: K >= 1 steps; step > 0 and noise >= 0 in [0, 1] pixel units; chains >= 1."""
    usage = ("sgld takes sgld:K or sgld:K:step:noise:chains (K >= 1 steps, step > 0, noise >= 0 in [0, 1] pixel "
             f"units, chains >= 1; JEM's recipe is step {SGLD_STEP:g}, noise {SGLD_NOISE:g}, {SGLD_CHAINS} chains)")
    if len(parts) not in (1, 4):
        raise UsageError(f"defense {text!r}: {usage}")
    try:
        steps = int(parts[0])
        step, noise = (float(parts[1]), float(parts[2])) if len(parts) == 4 else (SGLD_STEP, SGLD_NOISE)
        chains = int(parts[3]) if len(parts) == 4 else SGLD_CHAINS
    except ValueError:
        raise UsageError(f"defense {text!r}: {usage}") from None
    if steps < 1 or chains < 1 or not (math.isfinite(step) and step > 0) or not (math.isfinite(noise) and noise >= 0):
        raise UsageError(f"defense {text!r}: {usage}")
    return DefenseSpec("sgld", steps=steps, step_size=step, noise=noise, chains=chains)
