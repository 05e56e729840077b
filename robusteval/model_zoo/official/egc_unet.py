"""EGC's EBMUNetModel (Guo et al. 2023; GuoQiushan/EGC) with its official module names.

guided-diffusion's UNet whose attention layers are latent diffusion's spatial
transformers (self-attention, cross-attention on the label embedding, GEGLU
feed-forward), conditioned on a label through `label_emb` (num_classes + 1
rows: the last is the null label of the unconditional/classification mode).
The output map f(z_t, t, y) has one channel per class at every latent
position. The network defines

- classification (`cls_mode`): the null label, and a parameter-free attention
  pooling (`sattn`) of the map over positions → logits;
- energy: E(z_t, y) = −Σ_positions logsumexp_k f_k(z_t, t, y);
- ε̂(z_t, t, y) = ∇_z E, the official forward's output (−∇ of the summed logsumexp).

Key layout beyond guided_unet's: `label_emb.weight`,
`{input,output}_blocks.{i}.1.{norm,proj_in,proj_out}`,
`….transformer_blocks.{d}.{attn1,attn2}.{to_q,to_k,to_v,to_out.0}`,
`….transformer_blocks.{d}.ff.net.{0.proj,2}`, `….transformer_blocks.{d}.norm{1,2,3}`,
and for `pool='attn'`: `fc.0.{qkv_proj,c_proj}`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robusteval.core.errors import UsageError
from robusteval.model_zoo.official.guided_unet import (
    ConfigInferenceError,
    ContextBlock,
    UNetConfig,
    UNetSkeleton,
    block_indices,
    infer_unet_layout,
    qkv_attention,
)


class CrossAttention(nn.Module):
    """Multi-head attention of x on a context (itself when the context is None); q, k, v without bias."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context

        def split(t: Tensor) -> Tensor:  # (b, n, h·d) → (b·h, n, d)
            b, n, _ = t.shape
            return t.reshape(b, n, self.heads, -1).permute(0, 2, 1, 3).reshape(b * self.heads, n, -1)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        attention = (torch.bmm(q, k.transpose(1, 2)) * self.scale).softmax(dim=-1)
        out = torch.bmm(attention, v)
        b = x.shape[0]
        out = out.reshape(b, self.heads, -1, out.shape[-1]).permute(0, 2, 1, 3).reshape(b, -1, self.heads * out.shape[-1])
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU (dim → 4·dim) → dropout → Linear (4·dim → dim): keys `net.0.proj`, `net.2`."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(ContextBlock):
    """GroupNorm (eps 1e-6) → 1×1 conv in → transformer blocks over positions → 1×1 conv out, residual."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (b, h·w, inner)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens.transpose(1, 2).reshape(b, -1, h, w))


def simple_attention_pool(x: Tensor) -> Tensor:
    """EGC's parameter-free SimpleAttentionPool2d: the mean token attends to [mean, every position], q = k = v = x."""
    b, c = x.shape[:2]
    tokens = x.reshape(b, c, -1)
    tokens = torch.cat([tokens.mean(dim=-1, keepdim=True), tokens], dim=-1)
    scale = 1 / math.sqrt(math.sqrt(c))
    weight = torch.einsum("bct,bcs->bts", tokens[:, :, :1] * scale, tokens * scale).softmax(dim=-1)
    return torch.einsum("bts,bcs->bct", weight, tokens)[:, :, 0]


class AttentionPool2d(nn.Module):
    """EGC's `pool='attn'` (CLIP's pooling without the positional embedding): one head over C channels."""

    def __init__(self, channels: int, out_dim: int):
        super().__init__()
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(*x.shape[:2], -1)
        tokens = torch.cat([tokens.mean(dim=-1, keepdim=True), tokens], dim=-1)
        return self.c_proj(qkv_attention(self.qkv_proj(tokens), heads=1, legacy_order=False))[:, :, 0]


@dataclass(frozen=True)
class EGCOptions:
    """EBMUNetModel's own arguments (official ImageNet command: 4 heads × 64 channels, depth 1, context 512)."""

    num_classes: int = 1000
    context_dim: int = 512
    transformer_depth: int = 1
    transformer_heads: int = 4
    transformer_head_channels: int = 64
    pool: str = "sattn"


class EBMUNetModel(UNetSkeleton):
    """EGC's network: the UNet with spatial transformers, `label_emb`, and the pooled classification head."""

    def __init__(self, config: UNetConfig, options: EGCOptions):
        def attention(channels: int, up: bool) -> nn.Module:
            # The official passes num_heads (never num_heads_upsample) and num_head_channels as the head width.
            return SpatialTransformer(channels, options.transformer_heads, options.transformer_head_channels,
                                      options.transformer_depth, options.context_dim)

        super().__init__(config, attention)
        self.options = options
        self.num_classes = options.num_classes
        self.label_emb = nn.Embedding(options.num_classes + 1, options.context_dim)
        if options.pool == "attn":
            self.fc = nn.Sequential(AttentionPool2d(config.out_channels, options.num_classes))
        elif options.pool not in ("sattn", "adaptive"):
            raise UsageError(f"pool must be 'sattn', 'attn' or 'adaptive', got {options.pool!r}")

    def output_map(self, z: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        """f(z_t, t, y): (B, out_channels, h, w); y = None is the null label."""
        if y is None:
            y = torch.full((z.shape[0],), self.num_classes, dtype=torch.long, device=z.device)
        context = self.label_emb(y)[:, None, :]
        emb = self.embed_time(timesteps)
        h, skips = self.encode(z, emb, context)
        return self.decode(h, skips, emb, context)

    def pool(self, output_map: Tensor) -> Tensor:
        if self.options.pool == "sattn":
            return simple_attention_pool(output_map)
        if self.options.pool == "attn":
            return self.fc(output_map)
        return output_map.mean(dim=(2, 3))

    def classify(self, z: Tensor, timesteps: Tensor) -> Tensor:
        """The official cls_mode: null label, pooled output map."""
        return self.pool(self.output_map(z, timesteps))

    def energy(self, z: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        """E(z_t, y) = −Σ_positions logsumexp_k f_k(z_t, t, y), shape (B,)."""
        return -self.output_map(z, timesteps, y).logsumexp(dim=1).flatten(1).sum(dim=1)

    def forward(self, z: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        """ε̂ = ∇_z E(z_t, y): the official forward's output (outside cls_mode)."""
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            return torch.autograd.grad(self.energy(z, timesteps, y).sum(), z)[0]


def infer_egc_config(state: Mapping[str, Tensor], options: Mapping[str, Any] | None = None) -> tuple[UNetConfig, EGCOptions]:
    """EBMUNetModel's configuration from the shapes; head split and pool from `options` or the official command."""
    options = dict(options or {})
    layout = infer_unet_layout(state, "EGC EBMUNet")
    if layout.attention != "transformer" or "label_emb.weight" not in state:
        raise ConfigInferenceError(
            "not an EGC EBMUNetModel: it needs spatial transformers and 'label_emb.weight' "
            "(a class-conditional model trained with --use_spatial_transformer True)"
        )
    proj_in = next(k for k in state if k.endswith(".proj_in.weight"))
    prefix = proj_in[: -len("proj_in.weight")]
    inner = int(state[proj_in].shape[0])
    heads = int(options.get("num_heads", 4))
    if options.get("num_head_channels", -1) != -1:  # -1: unset, as in the official flags
        head_channels = int(options["num_head_channels"])
    elif inner % heads == 0:
        head_channels = inner // heads
    else:
        raise ConfigInferenceError(f"transformers of width {inner} do not split into {heads} heads; give num_heads")
    if heads * head_channels != inner:
        raise ConfigInferenceError(f"num_heads {heads} × num_head_channels {head_channels} ≠ transformer width {inner}")
    pool = options.get("pool", "attn" if "fc.0.qkv_proj.weight" in state else "sattn")
    egc = EGCOptions(
        num_classes=int(state["label_emb.weight"].shape[0]) - 1,
        context_dim=int(state["label_emb.weight"].shape[1]),
        transformer_depth=len(block_indices(state, prefix + "transformer_blocks")),
        transformer_heads=heads,
        transformer_head_channels=head_channels,
        pool=str(pool),
    )
    return replace(layout.config, num_heads=heads, num_head_channels=head_channels), egc
