"""jdm: Joint Diffusion Model (Deja, Trzciński & Tomczak 2023), at digits scale.

A small diffusion UNet ε(x_t, t) on variance-preserving states
x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε, whose encoder (down path and middle block)
also feeds a classifier: the encoder's feature maps are average-pooled,
concatenated and passed to an MLP head. Diffusion and classification are
trained jointly, end to end: loss = ε-MSE + α·cross-entropy (the head sees the
clean x0 at t = 0, as in the paper, and the noisy x_t, which makes it a
noise-aware classifier for guidance).

- logits(x, σ): the head at the t matching σ (t = (2/π)·atan(2σ); t = 0 for clean input);
- denoise(x, σ): Tweedie from ε̂, x − σ·ε̂(x_t, t) in pixel units;
- sample(n, y): reverse diffusion (DDIM/DDPM) from ε̂, with classifier guidance
  ε̂ − w·√(1 − ᾱ)·∇ log p(y | x_t) from the model's own head when y is given;
- counterfactual(x, target): the paper's visual counterfactual explanation:
  noise x to an intermediate t, then run guided reverse diffusion towards the target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robusteval.core.errors import UsageError
from robusteval.core.interface import JointModel
from robusteval.data import DatasetInfo, ImageDataset
from robusteval.model_zoo import diffusion
from robusteval.model_zoo.noise_nets import NoiseEmbedding
from robusteval.model_zoo.registry import register_model
from robusteval.training import DiffusionRecipe, TrainContext
from robusteval.training.loops import (
    DiffusionLosses,
    DiffusionObjective,
    FigureNames,
    train_diffusion_style,
)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    """DDPM residual block: GN → SiLU → conv, + time-embedding shift, GN → SiLU → conv, skip."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(embed_dim, out_channels)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(embedding)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class JointUNet(nn.Module):
    """A two-level UNet ε(x_t, t) plus a classifier on its pooled encoder features."""

    def __init__(self, channels: int, num_classes: int, width: int = 32, embed_dim: int = 128, head_hidden: int = 128):
        super().__init__()
        self.embedding = NoiseEmbedding(embed_dim)
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.down1 = ResBlock(width, width, embed_dim)
        self.downsample = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.down2 = ResBlock(2 * width, 2 * width, embed_dim)
        self.middle = ResBlock(2 * width, 2 * width, embed_dim)
        self.up2 = ResBlock(4 * width, 2 * width, embed_dim)
        self.upsample = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(2 * width, width, 3, padding=1))
        self.up1 = ResBlock(2 * width, width, embed_dim)
        self.out = nn.Sequential(_group_norm(width), nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1))
        # Deja et al.: pooled features of every encoder level (down path and middle), concatenated.
        self.head = nn.Sequential(nn.Linear(5 * width, head_hidden), nn.SiLU(), nn.Linear(head_hidden, num_classes))

    def encode(self, x_t: Tensor, t: Tensor) -> tuple[list[Tensor], Tensor]:
        """The encoder: skip features [h1, h2], the middle block's output; and the time embedding."""
        embedding = self.embedding(t)
        h1 = self.down1(self.conv_in(x_t), embedding)
        h2 = self.down2(self.downsample(h1), embedding)
        middle = self.middle(h2, embedding)
        return [h1, h2, middle], embedding

    def classify(self, features: list[Tensor]) -> Tensor:
        return self.head(torch.cat([f.mean(dim=(2, 3)) for f in features], dim=1))

    def decode(self, features: list[Tensor], embedding: Tensor) -> Tensor:
        h1, h2, middle = features
        h = self.up2(torch.cat([middle, h2], dim=1), embedding)
        h = self.up1(torch.cat([self.upsample(h), h1], dim=1), embedding)
        return self.out(h)

    def forward(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(ε̂, logits) in one pass."""
        features, embedding = self.encode(x_t, t)
        return self.decode(features, embedding), self.classify(features)


class JointDiffusionModel(JointModel):
    """The JDM joint model. σ of the contract maps to t = (2/π)·atan(2σ) (see `diffusion`)."""

    capabilities = frozenset({"logits", "denoise", "sample"})

    def __init__(
        self,
        info: DatasetInfo,
        width: int = 32,
        sample_steps: int = 50,
        sample_eta: float = 1.0,
        guidance_scale: float = 3.0,
    ):
        super().__init__()
        self.num_classes = info.num_classes
        self.input_shape = info.input_shape
        self.net = JointUNet(info.input_shape[0], info.num_classes, width=width)
        self.sample_steps = sample_steps
        self.sample_eta = sample_eta
        self.guidance_scale = guidance_scale

    # --- diffusion coordinates ----------------------------------------------------------------
    def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        """ε̂(x_t, t), internal scale."""
        features, embedding = self.net.encode(x_t, t)
        return self.net.decode(features, embedding)

    def class_logits(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The head's logits of p(y | x_t) (encoder only)."""
        features, _ = self.net.encode(x_t, t)
        return self.net.classify(features)

    def guided_eps(self, x_t: Tensor, t: Tensor, y: Tensor, scale: float) -> Tensor:
        """Classifier guidance (Dhariwal & Nichol 2021) with the model's own head: ε̂ − w·√(1 − ᾱ)·∇ log p(y | x_t)."""
        eps = self.eps(x_t, t)
        if scale == 0:
            return eps
        grad = diffusion.input_gradient(
            lambda z: self.class_logits(z, t).log_softmax(1).gather(1, y.view(-1, 1)).squeeze(1), x_t
        )
        return eps + scale * diffusion.eps_from_score(grad, t)

    # --- the contract ----------------------------------------------------------------------------
    def _logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        x_t, t = diffusion.pixel_to_vp(x, sigma)
        return self.class_logits(x_t, t)

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        x_t, t = diffusion.pixel_to_vp(x, sigma)
        return x - sigma.view(-1, 1, 1, 1) * self.eps(x_t, t)

    def _sample(self, n: int, y: Tensor | None, generator: torch.Generator | None) -> Tensor:
        x_start = diffusion.sample_noise((n, *self.input_shape), generator, self.device)
        return self._reverse(x_start, diffusion.time_grid(self.sample_steps), y, self.guidance_scale, generator)

    def _reverse(
        self, x_start: Tensor, times: Tensor, y: Tensor | None, scale: float, generator: torch.Generator | None
    ) -> Tensor:
        def eps_fn(x_t: Tensor, t: Tensor) -> Tensor:
            return self.eps(x_t, t) if y is None else self.guided_eps(x_t, t, y, scale)

        # The guidance gradient is taken locally (input_gradient); nothing else needs a graph.
        with torch.no_grad():
            x0 = diffusion.reverse_diffusion(eps_fn, x_start, times, eta=self.sample_eta, generator=generator)
        return diffusion.to_pixels(x0).clamp(0.0, 1.0)

    def counterfactual(
        self,
        x: Tensor,
        target: Tensor | int,
        t_start: float = 0.4,
        guidance_scale: float = 20.0,
        steps: int = 25,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Visual counterfactual explanations (Deja et al. 2023): x changed just enough to become `target`.

        Noise clean images x ∈ [0, 1] to diffusion time `t_start` (forward
        process, fresh noise from `generator`), then run `steps` classifier-guided
        reverse steps towards the target class(es) with guidance scale
        `guidance_scale`. Larger t_start or scale: more change, more flips.
        The defaults (t = 0.4, i.e. pixel noise σ ≈ 0.36; scale 20) flip the
        `standard` classifier to the target for ~98% of digits test images
        while moving them less (L2 ≈ 2.5) than a test image of the target
        class lies from them (≈ 3.0).
        """
        self._require("sample")
        self._check(x, 0.0)
        target = torch.as_tensor(target, dtype=torch.long, device=x.device)
        if target.dim() == 0:
            target = target.expand(x.shape[0])
        if target.shape != (x.shape[0],) or bool(((target < 0) | (target >= self.num_classes)).any()):
            raise UsageError(
                f"target must be a class index or {x.shape[0]} class indices in [0, {self.num_classes}), "
                f"got {target.tolist()}"
            )
        if not 0.0 < t_start <= diffusion.T_MAX:
            raise UsageError(f"t_start must lie in (0, {diffusion.T_MAX}], got {t_start}")
        if guidance_scale < 0:
            raise UsageError(f"guidance_scale must be >= 0, got {guidance_scale}")
        noise = diffusion.sample_noise(tuple(x.shape), generator, x.device)
        t = torch.full((x.shape[0],), t_start, device=x.device, dtype=x.dtype)
        x_t = diffusion.q_sample(diffusion.to_internal(x), t, noise)
        return self._reverse(x_t, diffusion.time_grid(steps, t_start=t_start), target, guidance_scale, generator)


def jdm_objective(model: JointDiffusionModel, ctx: TrainContext) -> DiffusionObjective:
    """ε-MSE(x_t) and CE(head(x0, t = 0)) + CE(head(x_t, t)), end to end; accuracy of the clean head."""

    def losses(x: Tensor, y: Tensor) -> DiffusionLosses:
        x0 = diffusion.to_internal(x)
        t = ctx.rand(x.shape[0]) * diffusion.T_MAX
        noise = ctx.randn_like(x0)
        eps_hat, noisy_logits = model.net(diffusion.q_sample(x0, t, noise), t)
        clean_logits = model.class_logits(x0, torch.zeros_like(t))
        eps_loss = F.mse_loss(eps_hat, noise)
        ce_loss = F.cross_entropy(clean_logits, y) + F.cross_entropy(noisy_logits, y)
        return DiffusionLosses(eps_loss, ce_loss, clean_logits)

    return losses


def train_jdm(model: JointDiffusionModel, data: ImageDataset, ctx: TrainContext) -> dict[str, float]:
    """The diffusion-style loop on the joint loss ε-MSE + α·(both CEs); EMA weights kept."""
    recipe = ctx.recipe_as(DiffusionRecipe)
    return train_diffusion_style(
        model, model.net, data, ctx, recipe, jdm_objective(model, ctx), "jdm", FigureNames("eps_mse", "accuracy")
    )


@register_model(
    "jdm",
    family="joint",
    system="Joint Diffusion Model (JDM)",
    paper="Deja, Trzciński & Tomczak 2023, Learning Data Representations with Joint Diffusion Models (ECML PKDD)",
    capabilities={"logits", "denoise", "sample"},
    trainer=train_jdm,
    default_epochs=100,
    recipe=DiffusionRecipe(ce_weight=0.1, batch_size=64, lr=2e-3, ema_decay=0.995),
    departures=(
        "The official classifier guidance shifts internal features of the UNet; this model guides in x_t with "
        "the gradient of its classifier head, so its counterfactuals and guided samples differ from the paper's.",
    ),
    description=(
        "Small diffusion UNet ε(x_t, t) (VP, cosine schedule, t = (2/π)·atan(2σ)) with a classifier head on pooled "
        "encoder features; trained jointly with ε-MSE + α·cross-entropy. Denoise by Tweedie from ε̂; samples by "
        "reverse diffusion with classifier guidance from its own head; counterfactual(x, target) as in the paper."
    ),
    randomness="sample() and counterfactual() draw Gaussian noise; logits and denoise are deterministic",
)
def jdm(info: DatasetInfo) -> JointModel:
    return JointDiffusionModel(info)
