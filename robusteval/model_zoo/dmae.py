"""DMAE: the Denoising Masked Autoencoder (Wu et al. 2023).

A small ViT encoder–decoder on 2×2 patches (16 tokens on an 8×8 digit) is
pre-trained as a masked autoencoder whose input is also Gaussian-noised:
x̃ = x + σ·n with σ = 0.25, 75% of the patches of x̃ are dropped at random, the
encoder sees the rest, and the decoder (with mask tokens) rebuilds the *clean*
image; the loss is the MSE over all pixels (not only the masked ones, unlike
MAE, since the visible patches must be denoised too).

Then a copy of the encoder plus a linear head is fine-tuned on noisy images
for classification, with the consistency regularisation of Jeong & Shin 2020
that the paper uses. The pre-trained encoder and decoder are kept for
denoising:

    logits(x, σ)  = head(pool(finetuned_encoder(x)))
    denoise(x, σ) = decoder(pretrained_encoder(x)) with no patch masked

Neither network is told σ (as in the paper): they see the noisy image only.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robusteval.core.interface import JointModel
from robusteval.data import DatasetInfo, ImageDataset
from robusteval.model_zoo.claims import DMAE_CLAIMS
from robusteval.model_zoo.registry import register_model
from robusteval.training import Recipe, TrainContext


def sincos_positions(grid: tuple[int, int], dim: int) -> Tensor:
    """MAE's fixed 2-D sine–cosine position embedding, (H·W, dim): half the channels per axis."""
    if dim % 4:
        raise ValueError(f"embedding dim must be a multiple of 4, got {dim}")
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * freqs.view(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class Block(nn.Module):
    """Pre-norm transformer block: multi-head self-attention and a GELU MLP, both residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.norm1(tokens)
        tokens = tokens + self.attention(h, h, h, need_weights=False)[0]
        return tokens + self.mlp(self.norm2(tokens))


class Patches(nn.Module):
    """Cut (B, C, H, W) images into (B, N, C·p·p) patch vectors and put them back."""

    def __init__(self, input_shape: tuple[int, int, int], patch: int):
        super().__init__()
        channels, height, width = input_shape
        if height % patch or width % patch:
            raise ValueError(f"image size {height}×{width} is not a multiple of the patch size {patch}")
        self.channels, self.patch, self.grid = channels, patch, (height // patch, width // patch)

    @property
    def count(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def size(self) -> int:
        return self.channels * self.patch**2

    def split(self, x: Tensor) -> Tensor:
        b, p, (gh, gw) = x.shape[0], self.patch, self.grid
        x = x.reshape(b, self.channels, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, gh * gw, self.size)

    def join(self, patches: Tensor) -> Tensor:
        b, p, (gh, gw) = patches.shape[0], self.patch, self.grid
        x = patches.reshape(b, gh, gw, self.channels, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, self.channels, gh * p, gw * p)


class Encoder(nn.Module):
    """ViT encoder: patch embedding + fixed positions, transformer blocks, final LayerNorm.

    `keep` (B, K) lists the visible patch indices of each image; None keeps all.
    """

    def __init__(self, patches: Patches, dim: int, depth: int, heads: int):
        super().__init__()
        self.embed = nn.Linear(patches.size, dim)
        self.register_buffer("positions", sincos_positions(patches.grid, dim), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, patch_vectors: Tensor, keep: Tensor | None = None) -> Tensor:
        tokens = self.embed((patch_vectors - 0.5) / 0.5) + self.positions
        if keep is not None:
            tokens = tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)


class Decoder(nn.Module):
    """MAE decoder: visible tokens and a shared mask token at every hidden position → pixels of every patch."""

    def __init__(self, patches: Patches, encoder_dim: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.project = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("positions", sincos_positions(patches.grid, dim), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, patches.size)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, encoded: Tensor, keep: Tensor | None = None) -> Tensor:
        visible = self.project(encoded)
        if keep is None:
            tokens = visible
        else:
            b, n, d = visible.shape[0], self.positions.shape[0], visible.shape[-1]
            tokens = self.mask_token.expand(b, n, d).clone()
            tokens.scatter_(1, keep.unsqueeze(-1).expand(-1, -1, d), visible)
        tokens = tokens + self.positions
        for block in self.blocks:
            tokens = block(tokens)
        # Pixels in [0, 1] scale, as 0.5 + 0.5·output (the encoder's input scaling, undone).
        return 0.5 + 0.5 * self.out(self.norm(tokens))


class DMAE(JointModel):
    """DMAE as a JointModel: logits from the fine-tuned encoder, denoise from the pre-trained autoencoder."""

    capabilities = frozenset({"logits", "denoise"})

    def __init__(
        self,
        info: DatasetInfo,
        patch: int = 2,
        dim: int = 64,
        depth: int = 4,
        decoder_dim: int = 64,
        decoder_depth: int = 2,
        heads: int = 4,
    ):
        super().__init__()
        self.num_classes = info.num_classes
        self.input_shape = info.input_shape
        self.patches = Patches(info.input_shape, patch)
        self.encoder = Encoder(self.patches, dim, depth, heads)
        self.decoder = Decoder(self.patches, dim, decoder_dim, decoder_depth, heads)
        self.classifier_encoder = Encoder(self.patches, dim, depth, heads)
        self.head = nn.Linear(dim, info.num_classes)

    def reconstruct(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Decoder output (unclamped) from the pre-trained encoder seeing the `keep` patches of x."""
        patch_vectors = self.patches.split(x)
        return self.patches.join(self.decoder(self.encoder(patch_vectors, keep), keep))

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        # The clean image lies in [0, 1], so its posterior mean does too.
        return self.reconstruct(x).clamp(0.0, 1.0)

    def _logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        tokens = self.classifier_encoder(self.patches.split(x))
        return self.head(tokens.mean(dim=1))


def random_keep(batch: int, count: int, mask_ratio: float, generator: torch.Generator) -> Tensor:
    """(B, K) sorted indices of the patches left visible, K = round(count·(1 − mask_ratio)), uniformly per image."""
    keep = max(1, round(count * (1.0 - mask_ratio)))
    order = torch.argsort(torch.rand(batch, count, generator=generator), dim=1)
    return order[:, :keep].sort(dim=1).values


def _cosine_with_warmup(optimiser: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda i: min(1.0, (i + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(i, total) / total))
    )


def consistency_loss(logits: Tensor, copies: int, weight: float, entropy_weight: float) -> Tensor:
    """Jeong & Shin 2020: KL from the mean prediction to each noisy copy's, plus the mean's entropy.

    `logits` is (copies·B, L), copy-major.
    """
    log_probs = logits.log_softmax(1).view(copies, -1, logits.shape[1])
    mean = log_probs.exp().mean(0)
    kl = (mean.unsqueeze(0) * (mean.clamp_min(1e-12).log().unsqueeze(0) - log_probs)).sum(-1).mean()
    entropy = -(mean * mean.clamp_min(1e-12).log()).sum(-1).mean()
    return weight * kl + entropy_weight * entropy


@dataclass(frozen=True)
class DMAERecipe(Recipe):
    """Two stages: noisy masked pre-training (AdamW, warm-up + cosine), then noisy fine-tuning with consistency."""

    batch_size: int = 64
    lr: float = 1e-3
    finetune_lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    pretrain_sigma: float = 0.25
    mask_ratio: float = 0.75
    finetune_fraction: float = 0.5  # fine-tuning epochs per pre-training epoch
    finetune_sigmas: tuple[float, ...] = (0.0, 0.25, 0.5)
    consistency_copies: int = 2
    consistency_weight: float = 1.0
    consistency_entropy: float = 0.1

    def check(self) -> None:
        super().check()
        self._require_positive("batch_size", "lr", "finetune_lr", "consistency_copies")
        self._require_non_negative("weight_decay", "warmup_steps", "pretrain_sigma", "finetune_fraction",
                                   "consistency_weight", "consistency_entropy")
        if not 0.0 <= self.mask_ratio < 1.0:
            self._fail("mask_ratio", "in [0, 1)")
        if not self.finetune_sigmas or min(self.finetune_sigmas) < 0:
            self._fail("finetune_sigmas", "a non-empty list of noise levels >= 0")


def train_dmae(model: DMAE, data: ImageDataset, ctx: TrainContext) -> dict[str, float]:
    """Stage 1: noisy masked pre-training of encoder+decoder; stage 2: fine-tune a copy of the encoder + head.

    `--epochs` counts the pre-training epochs; fine-tuning runs
    `finetune_fraction` as many.
    """
    cpu_started = time.process_time()
    recipe = ctx.recipe_as(DMAERecipe)
    batch_size = recipe.batch_size
    pretrain_sigma, mask_ratio = recipe.pretrain_sigma, recipe.mask_ratio
    steps_per_epoch = math.ceil(len(data) / batch_size)

    # --- stage 1: denoising masked autoencoder -------------------------------------------------
    autoencoder = list(model.encoder.parameters()) + list(model.decoder.parameters())
    optimiser = torch.optim.AdamW(autoencoder, lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = _cosine_with_warmup(optimiser, ctx.epochs * steps_per_epoch, recipe.warmup_steps)
    mse_sum = seen = 0.0
    bar = ctx.epoch_bar("dmae pre-train")
    for _ in bar:
        mse_sum = seen = 0.0
        for x, _y in ctx.batches(data, batch_size):
            model.train()
            noisy = x + pretrain_sigma * ctx.randn_like(x)
            keep = random_keep(len(x), model.patches.count, mask_ratio, ctx.generator).to(ctx.device)
            loss = F.mse_loss(model.reconstruct(noisy, keep), x)  # all pixels, clean target
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            mse_sum += float(loss.detach()) * len(x)
            seen += len(x)
        bar.set_postfix(mse=f"{mse_sum / seen:.5f}")
    figures = {"pretrain_mse": mse_sum / seen}

    # --- stage 2: fine-tune a copy of the encoder with a linear head on noisy images ------------
    model.classifier_encoder.load_state_dict(model.encoder.state_dict())
    model.encoder.requires_grad_(False)
    model.decoder.requires_grad_(False)
    sigmas = torch.tensor(recipe.finetune_sigmas)
    copies = recipe.consistency_copies
    finetune_epochs = max(1, round(recipe.finetune_fraction * ctx.epochs))
    params = list(model.classifier_encoder.parameters()) + list(model.head.parameters())
    optimiser = torch.optim.AdamW(params, lr=recipe.finetune_lr, weight_decay=recipe.weight_decay)
    schedule = _cosine_with_warmup(optimiser, finetune_epochs * steps_per_epoch, recipe.warmup_steps)
    ce_sum = correct = seen = 0.0
    finetune = copy.copy(ctx)
    finetune.epochs = finetune_epochs
    bar = finetune.epoch_bar("dmae fine-tune")
    for _ in bar:
        ce_sum = correct = seen = 0.0
        for x, y in ctx.batches(data, batch_size):
            model.train()
            # One σ per image from the recipe's list; `copies` noisy draws of each image.
            sigma = sigmas.to(ctx.device)[ctx.randint(len(sigmas), len(x))].view(-1, 1, 1, 1)
            repeated = x.repeat(copies, 1, 1, 1)
            noisy = repeated + sigma.repeat(copies, 1, 1, 1) * ctx.randn_like(repeated)
            logits = model._logits(noisy, sigma.new_zeros(len(noisy)))
            ce = F.cross_entropy(logits, y.repeat(copies))
            loss = ce + consistency_loss(logits, copies, recipe.consistency_weight, recipe.consistency_entropy)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            ce_sum += float(ce.detach()) * len(y)
            correct += float((logits[: len(y)].argmax(1) == y).sum())
            seen += len(y)
        bar.set_postfix(ce=f"{ce_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
    model.encoder.requires_grad_(True)
    model.decoder.requires_grad_(True)
    figures.update(finetune_cross_entropy=ce_sum / seen, finetune_accuracy=correct / seen,
                   finetune_epochs=float(finetune_epochs))
    # Single-threaded CPU time: what an idle core would take, whatever else shares the machine.
    figures["train_cpu_seconds"] = time.process_time() - cpu_started
    return figures


DMAE_RECIPE = DMAERecipe()


@register_model(
    "dmae",
    family="joint",
    system="Denoising Masked Autoencoder",
    paper="Wu, Ye, Gu, Zhang, Wang & He 2023, Denoising Masked Autoencoders Help Robust "
    "Classification (ICLR)",
    capabilities={"logits", "denoise"},
    trainer=train_dmae,
    default_epochs=200,
    recipe=DMAE_RECIPE,
    claims=DMAE_CLAIMS,
    departures=(
        "The official pre-training normalizes the target pixels per patch, so its decoder is not a denoiser of "
        "the image; this model's decoder rebuilds raw pixels and its `denoise` (decoder without masking) is an "
        "extension of the paper, not part of its evaluation.",
    ),
    description="ViT (2×2 patches, 16 tokens, dim 64, 4 encoder + 2 decoder blocks) pre-trained to rebuild the "
    "clean digit from x + N(0, 0.25²) with 75% of patches masked (MSE over all pixels); a copy of the encoder "
    "+ linear head (mean-pooled tokens) fine-tuned on x + σ·n, σ drawn per image from {0, 0.25, 0.5}, with "
    "consistency regularisation (2 noisy copies, Jeong & Shin 2020). "
    "denoise = unmasked reconstruction by the pre-trained encoder–decoder, clamped to [0, 1].",
)
def dmae(info: DatasetInfo) -> JointModel:
    return DMAE(info)
