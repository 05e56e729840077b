"""Latent diffusion's KL autoencoder (Rombach et al. 2022) with the latent-diffusion key names.

Written here rather than taken from diffusers: diffusers' AutoencoderKL names
its modules differently (`down_blocks.*.resnets.*`, `mid_block.attentions.*`)
and would need a key mapping, while this layout is small and loads the files
as CompVis/latent-diffusion and EGC write them (`autoencoder_kl.pth`: a bare
state dict; latent diffusion's `model.ckpt`: under `state_dict`, beside the
training loss's `loss.*` weights, which are ignored).

Key layout::

    encoder.conv_in, encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut},
    encoder.down.{i}.attn.{j}.{norm,q,k,v,proj_out}, encoder.down.{i}.downsample.conv,
    encoder.mid.{block_1,attn_1,block_2}, encoder.norm_out, encoder.conv_out,
    quant_conv, post_quant_conv,
    decoder.conv_in, decoder.mid.*, decoder.up.{i}.block.{j}.*, decoder.up.{i}.upsample.conv,
    decoder.norm_out, decoder.conv_out
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robusteval.model_zoo.official.guided_unet import (
    ConfigInferenceError,
    block_indices,
)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention with 1×1 convolutions q, k, v, proj_out."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)
        q = self.q(normed).reshape(b, c, h * w).transpose(1, 2)
        k = self.k(normed).reshape(b, c, h * w)
        v = self.v(normed).reshape(b, c, h * w)
        weights = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)  # (b, query, key)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3×3 convolution after padding right and bottom by one (latent diffusion's asymmetric pad)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@dataclass(frozen=True)
class AutoencoderConfig:
    """latent diffusion's ddconfig (+ embed_dim); defaults: the KL-f8 model EGC uses."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_levels: tuple[int, ...] = ()  # levels (0 = full resolution) with attention
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 4
    embed_dim: int = 4


def _level(blocks: list[nn.Module], attns: list[nn.Module], resample: nn.Module | None) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    if resample is not None:
        level.add_module("downsample" if isinstance(resample, Downsample) else "upsample", resample)
    return level


def _middle(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


class Encoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        levels = len(config.ch_mult)
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = config.ch
        for i, mult in enumerate(config.ch_mult):
            blocks, attns = [], []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(block_in, config.ch * mult))
                block_in = config.ch * mult
                if i in config.attn_levels:
                    attns.append(AttnBlock(block_in))
            self.down.append(_level(blocks, attns, Downsample(block_in) if i != levels - 1 else None))
        self.mid = _middle(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * config.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        levels = len(config.ch_mult)
        block_in = config.ch * config.ch_mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = _middle(block_in)
        up: list[nn.Module] = []
        for i in reversed(range(levels)):
            blocks, attns = [], []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, config.ch * config.ch_mult[i]))
                block_in = config.ch * config.ch_mult[i]
                if i in config.attn_levels:
                    attns.append(AttnBlock(block_in))
            up.insert(0, _level(blocks, attns, Upsample(block_in) if i != 0 else None))
        self.up = nn.ModuleList(up)  # indexed by level, run from the deepest
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """Encoder → quant_conv → (mean, log-variance); z → post_quant_conv → decoder. Images in [−1, 1]."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode_mean(self, x: Tensor) -> Tensor:
        """The posterior's mean latent (what EGC's evaluation classifies, before its scale factor)."""
        return self.quant_conv(self.encoder(x)).chunk(2, dim=1)[0]

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))


def autoencoder_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The autoencoder's own weights: a latent-diffusion training checkpoint also holds its loss (`loss.*`)."""
    return {k: v for k, v in state.items() if not k.startswith("loss.")}


def infer_autoencoder_config(state: Mapping[str, Tensor]) -> AutoencoderConfig:
    """The ddconfig of a KL autoencoder, read from its state dict's shapes."""
    required = ("encoder.conv_in.weight", "encoder.conv_out.weight", "quant_conv.weight", "post_quant_conv.weight",
                "decoder.conv_out.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise ConfigInferenceError(
            f"not a KL autoencoder in the latent-diffusion layout: keys {missing} are missing "
            f"(expected encoder.*, decoder.*, quant_conv.*, post_quant_conv.*)"
        )
    ch, in_channels = (int(d) for d in state["encoder.conv_in.weight"].shape[:2])
    levels = block_indices(state, "encoder.down")
    ch_mult, attn_levels = [], []
    for i in levels:
        blocks = block_indices(state, f"encoder.down.{i}.block")
        if i == 0:
            num_res_blocks = len(blocks)
        if len(blocks) != num_res_blocks:
            raise ConfigInferenceError(f"encoder level {i} has {len(blocks)} blocks where level 0 has {num_res_blocks}")
        out = int(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0])
        if out % ch:
            raise ConfigInferenceError(f"encoder level {i} has {out} channels, not a multiple of {ch}")
        ch_mult.append(out // ch)
        if block_indices(state, f"encoder.down.{i}.attn"):
            attn_levels.append(i)
    return AutoencoderConfig(
        ch=ch,
        ch_mult=tuple(ch_mult),
        num_res_blocks=num_res_blocks,
        attn_levels=tuple(attn_levels),
        in_channels=in_channels,
        out_ch=int(state["decoder.conv_out.weight"].shape[0]),
        z_channels=int(state["encoder.conv_out.weight"].shape[0]) // 2,
        embed_dim=int(state["quant_conv.weight"].shape[0]) // 2,
    )
