"""Gradient-masking checks: when do the robustness numbers look unreliable?

Each check returns a `Check` with status "pass", "flag" or "n/a"; the
flagged ones become the run's `flags` ("code: message" strings). They are:

- AutoAttack's own checks (`pyautoattack.checks`), run on the deployed
  pipeline: randomness (`check_randomized`), softmax outputs
  (`check_range_output`), gradients computed inside forward
  (`check_dynamic`), and Square beating the white-box attacks
  (`check_square_sr`).
- A randomized defense attacked without EOT.
- The fraction of clean points whose input gradient is zero or not finite
  (above 5%: gradient-based attacks are blind there).
- A black-box attack breaking more points than the white-box ones.
- Robust accuracy not reaching 2% at a very large ε (L∞ 0.5, or an L2
  radius that reaches the mid-grey image): a sound attack breaks nearly
  everything there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    same image lies within 0.5·√d, and at least 5.0 is used.
    """
    if norm == "Linf":
        return LARGE_EPS_LINF
    return max(LARGE_EPS_L2_MIN, 0.5 * math.sqrt(math.prod(input_shape)))


def autoattack_checks(pipeline: nn.Module, x: Tensor, y: Tensor, *, randomized: bool, eot: int,
                      adaptive_denoise: bool) -> list[Check]:
    """AutoAttack's randomness, softmax-output and dynamic-defense checks on the deployed pipeline.

    `randomized`: the pipeline is randomized by construction; `eot`: the
    EOT draws the attacks use; `adaptive_denoise`: the attacks differentiate
    through (or around, with BPDA) the gradients a denoiser computes inside
    its forward pass, so a "dynamic" forward is attacked adaptively.
    """
    from pyautoattack import checks as aa_checks

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


def gradient_masked(module: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """(B,) bool: the input gradient of the cross-entropy is all zero or not finite."""
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=x.device)
    inputs = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(module(inputs), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, inputs, allow_unused=True)
    if grad is None:
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    flat = grad.flatten(1)
    return (flat == 0).all(1) | ~torch.isfinite(flat).all(1)


def predict_with_gradient_check(module: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """One forward pass of a deterministic module: (predictions, gradient_masked flags of the correct points).

    The flags are those of `gradient_masked` for points predicted correctly, False for the others.
    """
    inputs = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = module(inputs)
        prediction = logits.detach().argmax(1)
        correct = prediction == y
        flags = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if not bool(correct.any()):
            return prediction, flags
        loss = F.cross_entropy(logits[correct], y[correct], reduction="sum")
        (grad,) = torch.autograd.grad(loss, inputs, allow_unused=True)
    if grad is None:
        flags[correct] = True
        return prediction, flags
    flat = grad[correct].flatten(1)
    flags[correct] = (flat == 0).all(1) | ~torch.isfinite(flat).all(1)
    return prediction, flags


def zero_gradient_check(masked: int, total: int, variant: str) -> Check:
    code = "zero-gradients" if variant == "full" else f"zero-gradients-{variant}"
    if total == 0:
        return Check(code, "n/a", "no correctly classified points to take gradients at")
    fraction = masked / total
    text = f"{masked} of {total} correctly classified points ({fraction:.1%}) have a zero or non-finite input gradient"
    if variant != "full":
        text += f" ({variant} gradient)"
    if fraction > ZERO_GRADIENT_LIMIT:
        return Check(code, "flag", text + f", above {ZERO_GRADIENT_LIMIT:.0%}: gradient-based attacks are blind there")
    return Check(code, "pass", text)


def square_check(accuracy_after: Mapping[str, Mapping[str, float]]) -> Check:
    """AutoAttack's check_square_sr for each run of a suite.

    `accuracy_after[label]` = {'clean': accuracy before the suite, member: robust accuracy after it, ...},
    in the order the members ran; `label` names the run (its ε, and gradient mode).
    """
    from pyautoattack import checks as aa_checks

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


def large_eps_check(robust: int, total: int, eps: float, norm: str) -> Check:
    if total == 0:
        return Check("large-eps", "n/a", "no points to check")
    accuracy = robust / total
    text = f"robust accuracy {accuracy:.1%} ({robust}/{total}) at {norm} eps={eps:g}"
    if accuracy > LARGE_EPS_ACCURACY_LIMIT:
        return Check("large-eps", "flag", text + f", above {LARGE_EPS_ACCURACY_LIMIT:.0%}: at this eps a sound attack "
                                                 "breaks nearly every point, so the attack is likely failing")
    return Check("large-eps", "pass", text)
