"""The deployed pipeline: what an attack sees and what decides a prediction.

Defenses (the `--defense` string, parsed by `robusteval.core.vocabulary.parse_defense`):

- `none`: logits(x, 0).
- `denoise:S`: purify with the model's own denoise(x, S), then classify the
  result at σ = 0. Deterministic.
- `denoise:S:noise`: add Gaussian noise of std S first, then denoise(x + S·n, S)
  and classify at σ = 0 (noise-and-denoise purification). Randomized.
- `noise:S`: classify logits(x + S·n, S). Randomized.
- `smooth:S:K`: the smoothed classifier, the majority vote of K noisy
  predictions at σ = S. Attacks see its soft version, log E[softmax], the
  expectation estimated with the EOT draws (Salman et al. 2019).
- `sgld:K[:step:noise:chains[:start]]` (models with an energy): JEM's SGLD
  refinement as its official evaluation runs it (wgrathwohl/JEM
  `attack_model.py`, `refined_logits`), in [0, 1] pixel units: `chains`
  copies of x get Gaussian noise of std `start` (default 0.015, JEM's
  --sigma 0.03; its README's L2 command uses 0), each runs K >= 0 steps of
  x ← x − step·∇ₓE(x) + noise·n (E = −logsumexp f for JEM; no clamping, as
  in the official code), and the logits of the refined copies are averaged.
  Defaults step 0.25, noise 0.005, 5 chains: the official 1, 0.01 and 0.03
  on its [−1, 1] scale (see `robusteval.core.vocabulary`). Randomized.
- `purify:S:K[:sampler]` (models with a denoiser): add Gaussian noise of
  std S, run K reverse steps of the model's own denoiser back to σ = 0
  (`ddpm` ancestral, the default, or `ddim` deterministic; the equations and
  the σ schedule are in `robusteval.attacks.purification`), classify at
  σ = 0. K = 1 is `denoise:S:noise`. Randomized.

Gradients through a denoiser or the SGLD chain (`gradient`): `full`
backpropagates through it exactly (Tweedie denoisers and SGLD differentiate
inside their forward pass, so this is double backprop); `bpda` replaces it
by the identity on the backward pass (Athalye et al. 2018; for SGLD this is
what JEM's own evaluation does, since its chain updates `x.data`). Through a
purification `full` is exact through all K steps, checkpointed per step
(memory: one step's activations plus K stored inputs), and `surrogate:K'`
takes the gradient of a K'-step purification from the same start noise
while the forward value stays the K-step one (Lee & Kim 2023). The forward
pass is the same in every mode.

Randomized pipelines decide by majority over `decision_draws` (100) fresh
noise draws: a single lucky draw is not a prediction. `fooled_on_any_draw`
judges an example on such draws the strict way (worst-of-N).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from robusteval.attacks.purification import draw_noise, purify, sigma_schedule
from robusteval.core import work_sizes
from robusteval.core.errors import UsageError
from robusteval.core.interface import (
    CapabilityError,
    JointModel,
    require_finite_logits,
    trusted_inputs,
)
from robusteval.core.straight_through import backward_through
from robusteval.core.vocabulary import DefenseSpec, parse_gradient

DECISION_DRAWS = 100


def require_defense_capabilities(model: JointModel, defense: DefenseSpec) -> None:
    """Raise CapabilityError when the defense needs what the model lacks (a denoiser, an energy for SGLD)."""
    needed = {"denoise": "denoise", "purify": "denoise", "sgld": "energy"}.get(defense.kind)
    if needed is not None and needed not in model.capabilities:
        raise CapabilityError(model.name, needed, model.capabilities)


class DeployedPipeline(nn.Module):
    """A model with its defense in the loop, as an nn.Module that returns logits.

    `forward(x)` is one draw of the pipeline (what attacks see);
    `expected(x, draws)` averages `draws` noise draws in one batched pass;
    `predict(x)` is the deployed decision (majority over fresh draws when
    randomized). Inputs are trusted: the engine validates the data once.
    `checkpointed=False` keeps every purification step's activations (for
    measuring what checkpointing saves; the gradient is the same).
    """

    def __init__(self, model: JointModel, defense: DefenseSpec, gradient: str = "full",
                 decision_draws: int = DECISION_DRAWS, checkpointed: bool = True):
        super().__init__()
        if gradient == "auto" or parse_gradient(gradient, defense) != gradient:
            raise UsageError(f"gradient must be 'full', 'bpda' or (purify only) 'surrogate:K' for one pipeline, "
                             f"got {gradient!r}")
        require_defense_capabilities(model, defense)
        if decision_draws < 1:
            raise UsageError(f"decision_draws must be >= 1, got {decision_draws}")
        self.model = model
        self.defense = defense
        self.gradient = gradient
        self.decision_draws = decision_draws
        self.checkpointed = checkpointed
        self.randomized = defense.randomized or bool(getattr(model, "stochastic_inference", False))
        # An evaluation module, never in train mode: torchattacks restores train mode on the whole pipeline
        # (the model included) after each attack when it finds the pipeline in train mode, after which every
        # pass would use batch statistics and overwrite the model's BatchNorm statistics.
        self.eval()

    # --- one draw -------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self._draw(x)

    def _draw(self, x: Tensor) -> Tensor:
        kind, sigma = self.defense.kind, self.defense.sigma
        if kind == "none":
            return self.model.logits(x, 0.0)
        if kind == "noise":
            return self.model.logits(x + sigma * torch.randn_like(x), sigma)
        if kind == "smooth":
            return torch.log_softmax(self.model.logits(x + sigma * torch.randn_like(x), sigma), dim=1)
        if kind == "sgld":
            return self._refined_logits(x)
        if kind == "purify":
            with trusted_inputs():  # the purified image may leave [0, 1] slightly: the pipeline built it
                return self.model.logits(self._purified(x), 0.0)
        noisy = x + sigma * torch.randn_like(x) if self.defense.add_noise else x
        return self.model.logits(self._purify(noisy), 0.0)

    def _purify(self, x: Tensor) -> Tensor:
        sigma = self.defense.sigma
        if self.gradient == "full" or not torch.is_grad_enabled():
            return self.model.denoise(x, sigma)
        with torch.no_grad():
            denoised = self.model.denoise(x, sigma)
        return backward_through(x, denoised)

    def _purified(self, x: Tensor) -> Tensor:
        """One draw of purify:S:K, differentiated as `gradient` says (see the module docstring)."""
        spec = self.defense
        noise = draw_noise(x, spec.steps, spec.sampler)
        sigmas = sigma_schedule(spec.sigma, spec.steps)
        if self.gradient == "full" or not torch.is_grad_enabled():
            return purify(self.model.denoise, x, sigmas, spec.sampler, noise, self.checkpointed)
        with torch.no_grad():
            purified = purify(self.model.denoise, x, sigmas, spec.sampler, noise)
        if self.gradient == "bpda":
            return backward_through(x, purified)
        # surrogate:K': the K'-step process from the same start noise carries the gradient (its own step draws).
        steps = int(self.gradient.partition(":")[2])
        proxy = purify(self.model.denoise, x, sigma_schedule(spec.sigma, steps), spec.sampler,
                       draw_noise(x, steps, spec.sampler, start=noise.start), self.checkpointed)
        return backward_through(proxy, purified)

    def _refined_logits(self, x: Tensor) -> Tensor:
        """JEM's refined_logits: `chains` noisy copies of each point refined by SGLD, their logits averaged."""
        spec = self.defense
        chains = spec.chains
        copies = x.unsqueeze(1).expand(x.shape[0], chains, *x.shape[1:]).reshape(x.shape[0] * chains, *x.shape[1:])
        # Drawn even at start 0, as the official code does: the chain's later draws then follow the same stream.
        start = copies + spec.start_noise * torch.randn_like(copies)
        full = self.gradient == "full" and torch.is_grad_enabled()
        chain = start if full else start.detach()
        for _ in range(spec.steps):
            # The chain leaves [0, 1] (JEM does not clamp it): these are inputs the pipeline built itself.
            with torch.enable_grad(), trusted_inputs():
                inputs = chain if chain.requires_grad else chain.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(self.model.energy(inputs, 0.0).sum(), inputs, create_graph=full)
            chain = inputs - spec.step_size * grad + spec.noise * torch.randn_like(inputs)
            if not full:
                chain = chain.detach()
        if not full and torch.is_grad_enabled():
            chain = backward_through(start, chain)  # BPDA: identity through the chain
        with trusted_inputs():
            logits = self.model.logits(chain, 0.0)
        return logits.view(x.shape[0], chains, -1).mean(1)

    def _draws_per_pass(self, x: Tensor) -> int:
        """Noise draws of the batch x stacked into one forward pass (SGLD runs `chains` images per input)."""
        images = x.shape[0] * (self.defense.chains if self.defense.kind == "sgld" else 1)
        return max(1, work_sizes.stacked_images(x.device) // max(1, images))

    # --- expectation over draws -----------------------------------------------------------------
    def expected(self, x: Tensor, draws: int) -> Tensor:
        """The EOT surrogate: mean logits over `draws` noise draws (smooth: log of the mean softmax)."""
        if not self.randomized or draws <= 1:
            return self._draw(x)
        chunk = self._draws_per_pass(x)
        total: Tensor | None = None
        done = 0
        while done < draws:
            k = min(chunk, draws - done)
            stacked = x.unsqueeze(0).expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])
            out = self._draw(stacked).view(k, x.shape[0], -1)
            if self.defense.kind == "smooth":
                out = out.exp()
            part = out.sum(0)
            total = part if total is None else total + part
            done += k
        mean = total / draws  # type: ignore[operator]
        return mean.clamp_min(1e-30).log() if self.defense.kind == "smooth" else mean

    # --- the deployed decision ------------------------------------------------------------------
    def _draw_votes(self, x: Tensor, draws: int) -> Iterator[Tensor]:
        """The predicted classes of `draws` fresh draws, in chunks of shape (k, B)."""
        chunk = self._draws_per_pass(x)
        done = 0
        while done < draws:
            k = min(chunk, draws - done)
            stacked = x.unsqueeze(0).expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])
            logits = self._draw(stacked)
            require_finite_logits(logits, self.model.name, "on its noisy decision draws")
            yield logits.argmax(1).view(k, x.shape[0])
            done += k

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Predicted classes (B,): argmax for a deterministic pipeline, else the majority of fresh draws.

        smooth:S:K votes with max(K, decision_draws) noisy predictions.
        """
        if not self.randomized:
            logits = self._draw(x)
            require_finite_logits(logits, self.model.name, "on clean inputs")
            return logits.argmax(1)
        counts = torch.zeros(x.shape[0], self.model.num_classes, dtype=torch.long, device=x.device)
        for votes in self._draw_votes(x, max(self.decision_draws, self.defense.votes)):
            counts.scatter_add_(1, votes.t(), torch.ones_like(votes.t()))
        return counts.argmax(1)

    @torch.no_grad()
    def fooled_on_any_draw(self, x: Tensor, y: Tensor) -> Tensor:
        """(B,) bool: some one of `decision_draws` fresh draws decides a class other than y (worst-of-N).

        A draw is one decision of the deployed pipeline: for smooth:S:K the vote of K noisy predictions
        (so this costs decision_draws·K passes), else one pass. A deterministic pipeline has one draw.
        """
        if not self.randomized:
            return self._draw(x).argmax(1) != y
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if self.defense.kind == "smooth":
            for _ in range(self.decision_draws):
                counts = torch.zeros(x.shape[0], self.model.num_classes, dtype=torch.long, device=x.device)
                for votes in self._draw_votes(x, self.defense.votes):
                    counts.scatter_add_(1, votes.t(), torch.ones_like(votes.t()))
                fooled |= counts.argmax(1) != y
            return fooled
        for votes in self._draw_votes(x, self.decision_draws):
            fooled |= (votes != y.unsqueeze(0)).any(0)
        return fooled


class Expectation(nn.Module):
    """The expectation model of a randomized pipeline, for attacks without their own EOT."""

    def __init__(self, pipeline: DeployedPipeline, draws: int):
        super().__init__()
        self.pipeline = pipeline
        self.draws = draws
        self.eval()  # see DeployedPipeline.__init__

    def forward(self, x: Tensor) -> Tensor:
        return self.pipeline.expected(x, self.draws)
