"""Discrete-time diffusion schedules of the official diffusion codebases, and their reverse processes.

guided-diffusion's convention: timesteps are integers 0 … T−1, ᾱ_t = ∏_{s≤t}(1 − β_s)
(so ᾱ_0 = 1 − β_0 < 1), x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε, and the network is fed
the integer t itself. The pixel noise level σ of robusteval's contract
([0, 1] scale, data scaled to [−1, 1] inside: noise 2σ) is the state whose
noise-to-signal ratio (1 − ᾱ)/ᾱ equals 4σ²; `matched_timestep` finds its
(fractional) t by interpolating ᾱ between the integer steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from robusteval.core.errors import UsageError

EpsFn = Callable[[Tensor, Tensor], Tensor]


def jdm_linear_betas(steps: int) -> np.ndarray:
    """joint_diffusion's "linear" schedule: β from 1e-3·(1000/T) to 0.02·(1000/T).

    Its get_named_beta_schedule starts at 0.001, not guided-diffusion's
    0.0001 (and uses 0.01·100/T for T < 10); we follow that code.
    """
    if steps < 10:
        scale, start = 100 / steps, 0.01
    else:
        scale, start = 1000 / steps, 0.001
    return np.linspace(scale * start, scale * 0.02, steps, dtype=np.float64)


def linear_betas(steps: int, start: float, end: float) -> np.ndarray:
    """guided-diffusion's "linear" schedule with explicit ends (EGC: 0.00085 … 0.012), scaled by 1000/T."""
    scale = 1000 / steps
    return np.linspace(scale * start, scale * end, steps, dtype=np.float64)


def cosine_betas(steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule, discretised as guided-diffusion's betas_for_alpha_bar."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)], dtype=np.float64
    )


def space_timesteps(steps: int, count: int, ddim: bool) -> list[int]:
    """The timesteps a respaced sampler visits, as guided-diffusion's `space_timesteps`.

    DDPM ("N"): N evenly spread steps including 0 and T−1 (rounded);
    DDIM ("ddimN"): every (T // N)-th step from 0.
    """
    if not 1 <= count <= steps:
        raise UsageError(f"the number of sampling steps must lie in [1, {steps}], got {count}")
    if ddim:
        return list(range(0, steps, steps // count))
    if count == 1:
        return [0]
    stride = (steps - 1) / (count - 1)
    return sorted({round(i * stride) for i in range(count)})


class DiscreteSchedule:
    """ᾱ of a β schedule, the σ ↔ t match, and the reverse process (DDPM / DDIM)."""

    def __init__(self, betas: np.ndarray):
        if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():
            raise UsageError("betas must be a 1-D array in (0, 1)")
        self.betas = torch.from_numpy(betas)
        self.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - betas))  # float64, like the official code
        self.num_timesteps = len(betas)

    def alpha_bar(self, t: Tensor) -> Tensor:
        """ᾱ at (possibly fractional) t ∈ [0, T−1], linear between integer steps; float64."""
        t = t.detach().double().cpu().clamp(0, self.num_timesteps - 1)
        low = t.floor().long()
        high = (low + 1).clamp(max=self.num_timesteps - 1)
        frac = t - low
        return (1 - frac) * self.alphas_cumprod[low] + frac * self.alphas_cumprod[high]

    def matched_timestep(self, sigma: Tensor) -> Tensor:
        """The fractional t whose ᾱ equals 1/(1 + 4σ²): pixel noise σ on [0, 1] images is x_t's noise there.

        σ below the first step's noise level (ᾱ > ᾱ_0) maps to t = 0, above the last to T − 1.
        """
        target = 1.0 / (1.0 + 4.0 * sigma.detach().double().cpu() ** 2)
        # alphas_cumprod decreases; search the increasing reversed array.
        increasing = self.alphas_cumprod.flip(0)
        position = torch.searchsorted(increasing, target).clamp(1, self.num_timesteps - 1)
        below, above = increasing[position - 1], increasing[position]
        frac = ((target - below) / (above - below)).clamp(0, 1)
        # reversed index position − 1 + frac ↔ t = (T − 1) − (position − 1 + frac)
        t = (self.num_timesteps - position).double() - frac
        t = torch.where(target >= self.alphas_cumprod[0], torch.zeros_like(t), t)
        return t.clamp(0, self.num_timesteps - 1).to(sigma.device, torch.float32)

    def q_sample(self, x0: Tensor, t: int, noise: Tensor) -> Tensor:
        abar = float(self.alphas_cumprod[t])
        return math.sqrt(abar) * x0 + math.sqrt(1 - abar) * noise

    def reverse(
        self,
        eps_fn: EpsFn,
        x: Tensor,
        timesteps: list[int],
        ddim: bool,
        clip_denoised: bool,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Run the reverse process from x at timesteps[-1] down through timesteps[0] to x0.

        Each step predicts x0 from ε (clipped to [−1, 1] if asked) and moves to the
        previous visited step s: DDPM samples the posterior q(x_s | x_t, x0) with
        the "fixed large" variance β' = 1 − ᾱ_t/ᾱ_s (guided-diffusion's default
        for ε-models without learned σ); DDIM (η = 0) is deterministic.
        """
        for i in reversed(range(len(timesteps))):
            t = timesteps[i]
            abar = float(self.alphas_cumprod[t])
            abar_prev = float(self.alphas_cumprod[timesteps[i - 1]]) if i > 0 else 1.0
            t_batch = torch.full((x.shape[0],), float(t), device=x.device)
            eps = eps_fn(x, t_batch)
            x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
            if clip_denoised:
                x0 = x0.clamp(-1, 1)
            if ddim:
                eps = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
                x = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * eps
                continue
            beta = 1 - abar / abar_prev
            mean = (math.sqrt(abar_prev) * beta / (1 - abar)) * x0 + (math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)) * x
            if i > 0:
                noise = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device)
                x = mean + math.sqrt(beta) * noise.to(x.device, x.dtype)
            else:
                x = mean
        return x
