"""Gradient-masking checks: when do the robustness numbers look unreliable?

Each check returns a `Check` with status "pass", "flag" or "n/a"; the
flagged ones become the run's `flags` ("code: message" strings). They are:

- AutoAttack's own checks (`pyautoattack.checks`), run on the deployed
  pipeline: randomness (`check_randomized`), softmax outputs
  (`check_range_output`), gradients computed inside forward
  (`check_dynamic`), and Square beating the white-box attacks
  (`check_square_sr`).
- A randomized defense attacked without EOT.
- The fraction of clean points whose cross-entropy input gradient is zero
  or not finite, with its cause: softmax saturation (the margin loss's
  gradient is fine; cleared once the scale-invariant remedies ran) or no
  usable gradient (the margin gradient is zero too; above 5% it stays
  flagged, saying which gradient-free escalation ran).
- A black-box attack breaking more points than the white-box ones.
- Robust accuracy not reaching 2% at a very large ε (L∞ 0.5, or an L2
  radius that reaches the mid-grey image): a sound attack breaks nearly
  everything there.
- A randomized pipeline whose worst-of-N robust accuracy (fooled on any one
  fresh decision draw) lies more than 5 points below its majority vote.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pyautoattack import checks as aa_checks
from torch import Tensor, nn

from robusteval.core.interface import require_finite_logits

ZERO_GRADIENT_LIMIT = 0.05
LARGE_EPS_ACCURACY_LIMIT = 0.02
LARGE_EPS_LINF = 0.5
LARGE_EPS_L2_MIN = 5.0
# AutoAttack's own tolerance for Square beating the white-box attacks (fraction of points).
SQUARE_TOLERANCE = 0.002


@dataclass(frozen=True)
class Check:
    code: str
    status: str  # "pass", "flag" or "n/a"
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"check": self.code, "status": self.status, "message": self.message}


def flags_of(checks: Sequence[Check]) -> list[str]:
    """The flagged checks as 'code: message' strings, in order."""
    return [f"{c.code}: {c.message}" for c in checks if c.status == "flag"]


class _Collector:
    """Stands in for the logger pyautoattack's checks warn through."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def warning(self, message: str) -> None:
        self.messages.append(str(message))

    info = debug = warning


def large_eps(norm: str, input_shape: tuple[int, ...]) -> float:
    """An ε at which any sound attack breaks (nearly) every point.

    L∞ 0.5 reaches the mid-grey image from any image in [0, 1]; for L2 the
    same image lies within 0.5·√d, and at least 5.0 is used; for L1 within 0.5·d (at least 5.0).
    """
    if norm == "Linf":
        return LARGE_EPS_LINF
    if norm == "L1":
        return max(LARGE_EPS_L2_MIN, 0.5 * math.prod(input_shape))
    return max(LARGE_EPS_L2_MIN, 0.5 * math.sqrt(math.prod(input_shape)))


def autoattack_checks(pipeline: nn.Module, x: Tensor, y: Tensor, *, randomized: bool, eot: int,
                      adaptive_denoise: bool) -> list[Check]:
    """AutoAttack's randomness, softmax-output and dynamic-defense checks on the deployed pipeline.

    `randomized`: the pipeline is randomized by construction; `eot`: the
    EOT draws the attacks use; `adaptive_denoise`: the attacks differentiate
    through (or around, with BPDA) the gradients a denoiser computes inside
    its forward pass, so a "dynamic" forward is attacked adaptively.
    """
    results: list[Check] = []
    collector = _Collector()
    aa_checks.check_randomized(pipeline, x, y, bs=x.shape[0], logger=collector)
    detected = bool(collector.messages)
    results.append(randomized_check(randomized, eot, detected=detected))

    collector = _Collector()
    aa_checks.check_range_output(pipeline, x, logger=collector)
    results.append(Check("softmax-output", "flag" if collector.messages else "pass",
                         "the outputs look like probabilities, not logits (AutoAttack's check_range_output); "
                         "margin and DLR losses are distorted" if collector.messages else
                         "outputs are not a probability distribution"))

    collector = _Collector()
    # check_dynamic counts calls in a module-level dict that it never resets.
    for key in aa_checks.funcs:
        aa_checks.funcs[key] = 0
    with torch.enable_grad():
        aa_checks.check_dynamic(pipeline, x, False, logger=collector)
    if not collector.messages:
        results.append(Check("dynamic-forward", "pass", "no gradients are computed inside the forward pass"))
    elif adaptive_denoise:
        results.append(Check("dynamic-forward", "pass",
                             "gradients are computed inside the forward pass (the denoiser's score); the attacks "
                             "differentiate through it (full) or around it (BPDA)"))
    else:
        results.append(Check("dynamic-forward", "flag",
                             "the forward pass computes gradients itself (AutoAttack's check_dynamic): "
                             "a dynamic defense that standard attacks may not evaluate reliably"))
    return results


def randomized_check(randomized: bool, eot: int, detected: bool = False) -> Check:
    """A defense that is randomized (by construction, or as `detected` by AutoAttack) needs EOT."""
    if not (randomized or detected):
        return Check("randomized-without-eot", "n/a", "the deployed pipeline is deterministic")
    how = "randomized by construction" if randomized else "AutoAttack's check_randomized saw outputs change"
    if eot > 1:
        return Check("randomized-without-eot", "pass", f"the defense is randomized ({how}); attacked with EOT over "
                                                       f"{eot} draws")
    return Check("randomized-without-eot", "flag",
                 f"the defense is randomized ({how}) but was attacked without EOT "
                 f"(--eot 1): gradients of single noise draws overestimate robustness; use --eot 20")


def masking_checks_disabled(randomized: bool, eot: int, variants: Sequence[str]) -> list[Check]:
    """What stands in for `autoattack_checks` and the zero-gradient checks when they are switched off.

    A defense randomized by construction is still flagged when attacked without EOT: that needs no model call.
    """
    off = "disabled (--no-masking-checks)"
    return [randomized_check(randomized, eot), Check("softmax-output", "n/a", off),
            Check("dynamic-forward", "n/a", off),
            *(Check("zero-gradients" if v == "full" else f"zero-gradients-{v}", "n/a", off) for v in variants)]


def _blind(grad: Tensor | None, rows: int, device: torch.device) -> Tensor:
    """(rows,) bool: the gradient is missing, all zero or not finite."""
    if grad is None:
        return torch.ones(rows, dtype=torch.bool, device=device)
    flat = grad.flatten(1)
    return (flat == 0).all(1) | ~torch.isfinite(flat).all(1)


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """(B,) the best other logit minus the true one: positive exactly where the point is misclassified."""
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, y.view(-1, 1), float("-inf"))
    return others.amax(1) - true


def _diagnose(logits: Tensor, inputs: Tensor, y: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """(CE blind, margin blind too) for the points `rows` of a forward pass `logits` of `inputs`.

    The cross-entropy's gradient underflows to exactly zero once softmax saturates in float32 (a margin of
    ~104 logit units); the margin's gradient does not, so it tells saturation from a real lack of gradient.
    """
    masked = torch.zeros(inputs.shape[0], dtype=torch.bool, device=inputs.device)
    dead = torch.zeros_like(masked)
    if not bool(rows.any()):
        return masked, dead
    ce = F.cross_entropy(logits[rows], y[rows], reduction="sum")
    (ce_grad,) = (torch.autograd.grad(ce, inputs, allow_unused=True, retain_graph=True) if ce.requires_grad
                  else (None,))
    masked[rows] = _blind(None if ce_grad is None else ce_grad[rows], int(rows.sum()), inputs.device)
    if bool(masked.any()):
        margin = margin_loss(logits[masked], y[masked]).sum()
        (margin_grad,) = torch.autograd.grad(margin, inputs, allow_unused=True) if margin.requires_grad else (None,)
        dead[masked] = _blind(None if margin_grad is None else margin_grad[masked], int(masked.sum()),
                              inputs.device)
    return masked, dead


def gradient_masked(module: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(B,) bools (masked, dead): the cross-entropy's input gradient is all zero or not finite; of those, the
    margin loss's gradient is too ("no usable gradient"; masked but not dead is softmax saturation)."""
    if x.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.bool, device=x.device)
        return empty, empty.clone()
    inputs = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = module(inputs)
        return _diagnose(logits, inputs, y, torch.ones(x.shape[0], dtype=torch.bool, device=x.device))


def predict_with_gradient_check(module: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One forward pass of a deterministic module: predictions and the (masked, dead) flags of `gradient_masked`
    for the points predicted correctly (False for the others)."""
    inputs = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = module(inputs)
        require_finite_logits(logits, str(getattr(getattr(module, "model", module), "name", "the model")),
                              "on clean inputs")
        prediction = logits.detach().argmax(1)
        masked, dead = _diagnose(logits, inputs, y, prediction == y)
    return prediction, masked, dead


SATURATION_CAUSE = "softmax saturation (CE blind, margin gradient fine)"
NO_GRADIENT_CAUSE = "no usable gradient (the margin gradient is zero too)"


def zero_gradient_check(masked: int, total: int, variant: str, dead: int = 0, remedies: Sequence[str] = (),
                        escalation: Sequence[str] = ()) -> Check:
    """Zero input gradients of the cross-entropy, with their cause.

    `masked` points have a blind CE gradient, `dead` of them a blind margin gradient too. Saturation alone
    is cleared when `remedies` (scale-invariant attacks) ran on the standing points; "no usable gradient"
    above the limit stays flagged, saying which gradient-free `escalation` ran.
    """
    code = "zero-gradients" if variant == "full" else f"zero-gradients-{variant}"
    if total == 0:
        return Check(code, "n/a", "no correctly classified points to take gradients at")
    fraction = masked / total
    text = f"{masked} of {total} correctly classified points ({fraction:.1%}) have a zero or non-finite input gradient"
    if variant != "full":
        text += f" ({variant} gradient)"
    if fraction <= ZERO_GRADIENT_LIMIT:
        return Check(code, "pass", text)
    saturated = masked - dead
    causes = (f"; cause: {SATURATION_CAUSE} on {saturated}, {NO_GRADIENT_CAUSE} on {dead}")
    if dead / total > ZERO_GRADIENT_LIMIT:
        ran = (f"; escalated with {', '.join(escalation)} on the points still standing" if escalation
               else "; no gradient-free escalation ran")
        return Check(code, "flag", text + causes + f", above {ZERO_GRADIENT_LIMIT:.0%}: gradient-based attacks are "
                                                   "blind there" + ran)
    if remedies:
        return Check(code, "pass", text + causes + f"; cleared: the scale-invariant remedies {', '.join(remedies)} "
                                                   "attacked every point the attack left standing")
    return Check(code, "flag", text + causes + f", above {ZERO_GRADIENT_LIMIT:.0%}: gradient-based attacks are "
                                               "blind there")


def square_check(accuracy_after: Mapping[str, Mapping[str, float]]) -> Check:
    """AutoAttack's check_square_sr for each run of a suite.

    `accuracy_after[label]` = {'clean': accuracy before the suite, member: robust accuracy after it, ...},
    in the order the members ran; `label` names the run (its ε, and gradient mode).
    """
    applicable = [label for label, accs in accuracy_after.items() if "square" in accs and len(accs) > 2]
    if not applicable:
        return Check("square-beats-white-box", "n/a", "the attack is not a suite with Square and white-box members")
    fired = []
    for label in applicable:
        collector = _Collector()
        aa_checks.check_square_sr(dict(accuracy_after[label]), alpha=SQUARE_TOLERANCE, logger=collector)
        if collector.messages:
            fired.append(f"{label}: {collector.messages[0]}")
    if fired:
        return Check("square-beats-white-box", "flag", "; ".join(fired))
    return Check("square-beats-white-box", "pass",
                 "Square broke no more than 0.2% of points the white-box attacks missed")


def black_box_check(broken_by: Mapping[float, Mapping[str, int]], black_box: set[str], white_box: set[str]) -> Check:
    """Flag an ε where black-box attacks broke more points than all white-box attacks together."""
    if not black_box or not white_box:
        return Check("black-box-stronger", "n/a", "the attack does not combine black-box and white-box attacks")
    fired = []
    for eps, counts in broken_by.items():
        black = sum(v for k, v in counts.items() if k in black_box)
        white = sum(v for k, v in counts.items() if k not in black_box)
        if black > white:
            fired.append(f"eps={eps:g}: black-box {black} vs white-box {white} points")
    if fired:
        return Check("black-box-stronger", "flag",
                     "a black-box attack broke more points than the white-box attacks ("
                     + "; ".join(fired) + "): gradients are likely masked")
    return Check("black-box-stronger", "pass", "white-box attacks broke at least as many points as black-box ones")


def large_eps_check(robust: int, total: int, eps: float, norm: str, escalation: Sequence[Mapping] = (),
                    ceiling: int | None = None) -> Check:
    """Robust accuracy at a very large ε, after the escalation rounds that ran (each {scale, eot, steps, robust})."""
    if total == 0:
        return Check("large-eps", "n/a", "no points to check")
    accuracy = robust / total
    text = f"robust accuracy {accuracy:.1%} ({robust}/{total}) at {norm} eps={eps:g}"
    if escalation:
        text += " after escalating the survivors (" + "; ".join(
            f"×{r['scale']}: EOT {r['eot']}, steps {r['steps']}, {r['robust']} left" for r in escalation) + ")"
    if accuracy > LARGE_EPS_ACCURACY_LIMIT:
        reached = (f"; the escalation ceiling (×{ceiling}) was reached at {accuracy:.1%}"
                   if escalation and ceiling is not None and escalation[-1]["scale"] >= ceiling else "")
        return Check("large-eps", "flag", text + f", above {LARGE_EPS_ACCURACY_LIMIT:.0%}: at this eps a sound attack "
                                                 "breaks nearly every point, so the attack is likely failing" + reached)
    return Check("large-eps", "pass", text)


DECISION_GAP_LIMIT = 0.05


def decision_gap_check(counts: Mapping[float, tuple[int, int, int]]) -> Check:
    """Majority-vote vs worst-of-N robust accuracy of a randomized pipeline: `counts[eps]` = (majority, worst, n).

    Worst-of-N counts a point as broken when any one fresh draw of the decision is fooled; a gap above
    DECISION_GAP_LIMIT means the majority figure rests on examples that fool the defense part of the time.
    """
    gaps = {eps: (m - w) / n for eps, (m, w, n) in counts.items() if n}
    text = "; ".join(f"eps={eps:g}: majority {counts[eps][0] / counts[eps][2]:.1%}, worst-of-N "
                     f"{counts[eps][1] / counts[eps][2]:.1%}" for eps in gaps)
    if any(gap > DECISION_GAP_LIMIT for gap in gaps.values()):
        largest = max(gaps, key=lambda e: gaps[e])
        return Check("decision-gap", "flag", f"{text}: the worst-of-N figure is {gaps[largest]:.1%} lower at "
                                             f"eps={largest:g} (above {DECISION_GAP_LIMIT:.0%}): adversarial examples "
                                             "fool the randomized defense on part of its draws")
    return Check("decision-gap", "pass", text)
