"""Variance-preserving (VP) diffusion utilities shared by the diffusion models of the zoo.

Conventions
-----------
Images enter a diffusion model in its internal scale x0' = 2·x0 − 1 ∈ [−1, 1].
The forward process is x_t = √ᾱ_t · x0' + √(1 − ᾱ_t) · ε with the cosine
schedule in continuous time t ∈ [0, 1] (Nichol & Dhariwal 2021, offset s = 0):

    ᾱ(t) = cos²(πt/2),   so the noise-to-signal ratio is s(t) = √((1 − ᾱ)/ᾱ) = tan(πt/2).

The contract's noisy input x = x0 + σ·n (σ in the [0, 1] pixel scale) becomes,
in the internal scale, x' = x0' + 2σ·n; dividing by √(1 + (2σ)²) gives exactly
x_t with s(t) = 2σ. So σ ↔ t is t = (2/π)·atan(2σ), and σ = 0 is t = 0.

Tweedie's formula, E[x0' | x_t] = (x_t − √(1 − ᾱ)·ε̂) / √ᾱ, turns an ε (or
score, ε̂ = −√(1 − ᾱ)·∇ log p(x_t)) prediction into a denoiser; in pixel
units it reads x − σ·ε̂.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from robusteval.core import draws

# Internal scale: x' = PIXEL_SCALE·x − 1, so pixel noise σ is PIXEL_SCALE·σ inside.
PIXEL_SCALE = 2.0
# Sampling starts here rather than at t = 1, where ᾱ = 0 and Tweedie divides by zero;
# tan(π·0.995/2) ≈ 127, so x_t is pure noise to within 1% of the signal.
T_MAX = 0.995

EpsFn = Callable[[Tensor, Tensor], Tensor]


def alpha_bar(t: Tensor) -> Tensor:
    """ᾱ(t) = cos²(πt/2) of the cosine schedule, for t ∈ [0, 1]."""
    return torch.cos(0.5 * math.pi * t).pow(2)


def noise_ratio(t: Tensor) -> Tensor:
    """√((1 − ᾱ)/ᾱ) = tan(πt/2): the noise std relative to the signal, internal scale."""
    return torch.tan(0.5 * math.pi * t)


def t_from_noise_ratio(ratio: Tensor) -> Tensor:
    """Inverse of `noise_ratio`: the t at which x_t carries noise `ratio` relative to the signal."""
    return (2.0 / math.pi) * torch.atan(ratio)


def t_from_pixel_sigma(sigma: Tensor) -> Tensor:
    """The diffusion time t matching pixel-scale noise σ (x = x0 + σ·n, x0 ∈ [0, 1])."""
    return t_from_noise_ratio(PIXEL_SCALE * sigma)


def pixel_sigma_from_t(t: Tensor) -> Tensor:
    """The pixel-scale noise σ matching diffusion time t."""
    return noise_ratio(t) / PIXEL_SCALE


def to_internal(x: Tensor) -> Tensor:
    """[0, 1] pixels → the model's internal [−1, 1] scale."""
    return PIXEL_SCALE * x - 1.0


def to_pixels(x: Tensor) -> Tensor:
    """Internal [−1, 1] scale → [0, 1] pixels (not clipped)."""
    return (x + 1.0) / PIXEL_SCALE


def _per_sample(value: Tensor, like: Tensor) -> Tensor:
    return value.view(-1, *([1] * (like.dim() - 1)))


def pixel_to_vp(x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Map a noisy pixel image x = x0 + σ·n to the VP state (x_t, t) that has the same noise.

    σ is a (B,) tensor; σ = 0 gives t = 0 and x_t = 2x − 1.
    """
    t = t_from_pixel_sigma(sigma)
    x_t = to_internal(x) * _per_sample(alpha_bar(t).sqrt(), x)
    return x_t, t


def q_sample(x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """The forward process: x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε, with x0 in the internal scale."""
    a = _per_sample(alpha_bar(t), x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def predict_x0(x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """Tweedie: E[x0 | x_t] = (x_t − √(1 − ᾱ)·ε̂)/√ᾱ, internal scale. Needs ᾱ > 0 (t < 1)."""
    a = _per_sample(alpha_bar(t), x_t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def eps_from_score(score: Tensor, t: Tensor) -> Tensor:
    """ε̂ = −√(1 − ᾱ_t)·∇ log p(x_t): the noise prediction a score implies."""
    return -_per_sample((1 - alpha_bar(t)).sqrt(), score) * score


def time_grid(steps: int, t_start: float = T_MAX, t_end: float = 0.0) -> Tensor:
    """steps + 1 times from t_start down to t_end, uniform in t (the cosine schedule's own spacing)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 <= t_end < t_start <= T_MAX:
        raise ValueError(f"need 0 <= t_end < t_start <= {T_MAX}, got t_start={t_start}, t_end={t_end}")
    return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64).float()


def ddim_step(
    x_t: Tensor,
    eps: Tensor,
    t: float,
    t_next: float,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip: bool = True,
) -> Tensor:
    """One reverse step x_t → x_{t_next} (Song et al. 2021, DDIM; eta = 1 is DDPM's ancestral step).

    `clip` clips the Tweedie estimate of x0 to [−1, 1], as DDPM samplers do.
    """
    device, dtype = x_t.device, x_t.dtype
    a = float(alpha_bar(torch.tensor(t, dtype=torch.float64)))
    a_next = float(alpha_bar(torch.tensor(t_next, dtype=torch.float64)))
    x0 = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
        # Re-derive ε from the clipped x0 so that the step stays on the DDIM path.
        eps = (x_t - math.sqrt(a) * x0) / math.sqrt(1 - a)
    if t_next <= 0.0:
        return x0
    sigma_eta = eta * math.sqrt((1 - a_next) / (1 - a)) * math.sqrt(max(0.0, 1 - a / a_next))
    direction = math.sqrt(max(0.0, 1 - a_next - sigma_eta**2)) * eps
    x_next = math.sqrt(a_next) * x0 + direction
    if sigma_eta > 0:
        x_next = x_next + sigma_eta * draws.randn(tuple(x_t.shape), generator, device, dtype)
    return x_next


def reverse_diffusion(
    eps_fn: EpsFn,
    x_start: Tensor,
    times: Tensor,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip: bool = True,
) -> Tensor:
    """Run reverse steps from x_start at times[0] through times[-1]; return the final state.

    `eps_fn(x_t, t)` returns ε̂ for a batch at the (B,) times t. With times[-1] = 0
    the result is the final Tweedie estimate of x0 (internal scale).
    """
    x = x_start
    for t, t_next in zip(times[:-1].tolist(), times[1:].tolist()):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        x = ddim_step(x, eps_fn(x, t_batch), t, t_next, eta=eta, generator=generator, clip=clip)
    return x


def sample_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard normal noise drawn on the generator's device (the CPU without one: reproducible across
    devices), moved to `device`."""
    return draws.randn(shape, generator, device)


def sinusoidal_embedding(value: Tensor, dim: int, max_period: float = 1000.0) -> Tensor:
    """Transformer/DDPM-style sin–cos features of a (B,) scalar (scaled by 1000, as DDPM's step index)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=value.device, dtype=value.dtype) / half)
    angles = 1000.0 * value.view(-1, 1) * freqs.view(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def input_gradient(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """∇ₓ Σᵢ fn(x)ᵢ for a function returning one scalar per image, by autograd.

    Works under `torch.no_grad()` and `torch.inference_mode()` callers (it
    enables grad locally on a fresh copy of x and returns a detached result).
    When the caller itself differentiates with respect to x (grad mode on and
    x.requires_grad), the graph is kept (create_graph=True) so that the result
    is differentiable: attacks can back-propagate through a score-based denoiser.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        (grad,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
        return grad
    with torch.inference_mode(False), torch.enable_grad():
        leaf = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(leaf).sum(), leaf)
    return grad.detach()
