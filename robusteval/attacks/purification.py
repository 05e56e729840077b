"""Multi-step purification by a model's own denoiser (`--defense purify:S:K[:sampler]`).

DiffPure (Nie et al. 2022) diffuses the input to a noise level and runs the
model's reverse process back before classifying. Here every model with a
denoiser does it through the one contract it keeps, `denoise(x, σ) =
E[x0 | x0 + σ·n]` in the [0, 1] pixel scale (variance-preserving models
convert at their boundary), in the variance-exploding σ parametrisation:

    x_0 = x + S·n,  n ~ N(0, I)                                   (the start)
    for k = 0 … K−1, with x̂_k = denoise(x_k, σ_k):
      ddim (η = 0):   x_{k+1} = x̂_k + (σ_{k+1}/σ_k)·(x_k − x̂_k)
      ddpm (ancestral): x_{k+1} = x̂_k + (σ_{k+1}²/σ_k²)·(x_k − x̂_k)
                                 + σ_{k+1}·√(1 − σ_{k+1}²/σ_k²)·z_{k+1},  z_{k+1} ~ N(0, I)
    the purified image is x_K (σ_K = 0, so the last step returns x̂_{K−1}).

`ddim` is DDIM with η = 0 written for x_t = x0 + σ_t·n (Song et al. 2021,
eq. 12 in the VE form; it is also EDM's Euler step x + (σ_{k+1} − σ_k)·(x − x̂)/σ_k,
Karras et al. 2022, Alg. 1). `ddpm` samples the exact posterior
q(x_{σ'} | x_σ, x0 = x̂) of the VE process: mean x̂ + (σ'²/σ²)(x − x̂),
variance σ'²(1 − σ'²/σ²). With K = 1 both return denoise(x + S·n, S), which
is the `denoise:S:noise` pipeline draw for draw. Models whose denoiser is a
one-shot posterior mean at any σ (cdn's Tweedie, dncnn) run the same updates.

The σ schedule (`sigma_schedule`): σ_0 = S, then EDM's ρ = 7 spacing down to
σ_{K−1} = min(σ_min, S) with σ_min = 0.01 (2.55 grey levels of 255; the lowest
level cdn is trained at, EDM's 0.002 on its [−1, 1] scale being far below the
digits models' training ranges), and σ_K = 0:

    σ_i = (S^{1/ρ} + i/(K−1)·(σ_min^{1/ρ} − S^{1/ρ}))^ρ  for 0 < i < K.

All randomness (the start noise and, for ddpm, the K − 1 step draws z) is
drawn up front (`draw_noise`), so a purification is a deterministic function
of (x, draws): exact gradients, their checkpointed recomputation and the
surrogates below see the same draws.

Gradients (`DeployedPipeline` of robusteval.attacks.defenses): `full` backpropagates through all K steps
with activation checkpointing per step (`CheckpointedStep`: each step's input
is stored, its activations are recomputed during the backward pass, so peak
memory is one step's activations plus K stored inputs; the last step keeps
its activations, which the backward pass uses first); `bpda` is the
identity on the backward pass (Athalye et al. 2018); `surrogate:K'` returns
the K-step purification but takes its gradient through a K'-step process from
the same start (Lee & Kim 2023).

Why not `torch.utils.checkpoint` (use_reentrant=False): the Tweedie
denoisers (cdn, egc) take an input gradient inside their forward pass; under
non-reentrant checkpointing that inner backward triggers a recomputation
during the forward whose tensors stay alive until the outer backward. Tried
first on cdn (batch 32, allocations summed from torch.profiler): 27 MB at
K = 1 grew to 491 MB at K = 20, more than the 307 MB without checkpointing,
and a gradient took 2.8× as long.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, float], Tensor]
SAMPLERS = ("ddpm", "ddim")
SIGMA_MIN = 0.01
RHO = 7.0


def sigma_schedule(start: float, steps: int) -> list[float]:
    """The K + 1 noise levels σ_0 = S > … > σ_{K−1} = min(σ_min, S) > σ_K = 0 (EDM's ρ = 7 spacing)."""
    if steps < 1 or not start > 0:
        raise ValueError(f"a purification needs S > 0 and K >= 1 steps, got S={start}, K={steps}")
    if steps == 1:
        return [float(start), 0.0]
    high, low = start ** (1 / RHO), min(SIGMA_MIN, start) ** (1 / RHO)
    return [float(start)] + [(high + i / (steps - 1) * (low - high)) ** RHO for i in range(1, steps)] + [0.0]


@dataclass
class PurificationNoise:
    """The draws of one purification: the start noise n and, for ddpm, z_1 … z_{K−1}."""

    start: Tensor
    steps: list[Tensor]


def draw_noise(x: Tensor, steps: int, sampler: str, start: Tensor | None = None) -> PurificationNoise:
    """Fresh draws from the global generator, in this order: n (unless `start` is given), then z_1 … z_{K−1}
    (ddpm only)."""
    start = torch.randn_like(x) if start is None else start
    return PurificationNoise(start, [torch.randn_like(x) for _ in range(steps - 1)] if sampler == "ddpm" else [])


def reverse_step(denoise: Denoiser, x: Tensor, sigma: float, next_sigma: float, sampler: str,
                 z: Tensor | None) -> Tensor:
    """One update x_k (at σ_k) → x_{k+1} (at σ_{k+1}) of the module docstring."""
    estimate = denoise(x, sigma)
    if next_sigma == 0:
        return estimate
    ratio = next_sigma / sigma
    if sampler == "ddim":
        return estimate + ratio * (x - estimate)
    if z is None:
        raise ValueError("an ancestral (ddpm) step needs its noise draw z")
    return estimate + ratio**2 * (x - estimate) + next_sigma * math.sqrt(1.0 - ratio**2) * z


class CheckpointedStep(torch.autograd.Function):
    """One reverse step whose activations are recomputed in the backward pass (only its input is stored).

    The forward runs without a graph; the backward replays the step from the stored input, the same draw z and
    the same global RNG state (for denoisers that draw randomness themselves) with a graph, and returns the
    exact vector–Jacobian product. Gradients flow to x only (an attack's need), not to the model's weights.
    """

    @staticmethod
    def forward(ctx, x: Tensor, z: Tensor | None, step: Callable[[Tensor, Tensor | None], Tensor]) -> Tensor:  # type: ignore[override]
        ctx.step = step
        ctx.cpu_state = torch.get_rng_state()
        ctx.cuda_state = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.save_for_backward(x, *(() if z is None else (z,)))
        with torch.no_grad():
            return step(x, z)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        x, *rest = ctx.saved_tensors
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(ctx.cpu_state)
            if ctx.cuda_state is not None:
                torch.cuda.set_rng_state(ctx.cuda_state, x.device)
            inputs = x.detach().requires_grad_(True)
            out = ctx.step(inputs, rest[0] if rest else None)
            (grad_x,) = torch.autograd.grad(out, inputs, grad)
        return grad_x, None, None


def purify(denoise: Denoiser, x: Tensor, sigmas: list[float], sampler: str, noise: PurificationNoise,
           checkpointed: bool = True) -> Tensor:
    """x_K of the module docstring: x + σ_0·n, then the K = len(sigmas) − 1 reverse steps.

    Differentiable in x when grad mode is on; with `checkpointed` each step but the last stores only its input.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    state = x + sigmas[0] * noise.start
    for k in range(len(sigmas) - 1):
        z = noise.steps[k] if sampler == "ddpm" and sigmas[k + 1] > 0 else None

        def step(h: Tensor, draw: Tensor | None, k: int = k) -> Tensor:
            return reverse_step(denoise, h, sigmas[k], sigmas[k + 1], sampler, draw)

        # The last step keeps its activations: the backward pass needs them first, so recomputing them would
        # cost a forward pass and save no peak memory (one step's activations are alive during any recompute).
        last = k == len(sigmas) - 2
        if checkpointed and not last and torch.is_grad_enabled() and state.requires_grad:
            state = CheckpointedStep.apply(state, z, step)
        else:
            state = step(state, z)
    return state
