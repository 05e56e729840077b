"""guided-diffusion's UNet (Dhariwal & Nichol 2021) with its official module names.

Two released systems build on it: the joint diffusion model of Deja et al.
(a classifier head `clasifier` on the encoder's pooled features, see
`jdm.py`) and EGC (spatial transformers instead of attention blocks, see
`egc_unet.py`). This module holds the shared pieces — the timestep
embedding, `ResBlock`, `AttentionBlock`, down/up sampling, the UNet skeleton
— and the inference of a network's configuration from a state dict's
shapes, so that every size the official scripts can train loads.

Key layout (what a file written by the official code holds)::

    time_embed.{0,2}.*                      sinusoidal embedding → MLP
    input_blocks.0.0.*                      the first 3×3 convolution
    input_blocks.{i}.0.{in_layers,emb_layers,out_layers,skip_connection}.*   ResBlock
    input_blocks.{i}.1.{norm,qkv,proj_out}.*                                  AttentionBlock
    input_blocks.{i}.0.op.*                 Downsample (strided conv)
    middle_block.{0,1,2}.*                  ResBlock, attention, ResBlock
    output_blocks.{j}.{0,1,2}.*             ResBlock [+ attention] [+ Upsample `conv`]
    out.{0,2}.*                             GroupNorm, SiLU, 3×3 convolution
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robusteval.core.checkpoints import CheckpointError
from robusteval.core.errors import UsageError


class ConfigInferenceError(CheckpointError):
    """The network's configuration cannot be read from the checkpoint's shapes."""


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """guided-diffusion's sinusoidal embedding: [cos(t·f), sin(t·f)], f = max_period^(−i/half); t may be fractional."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def normalization(channels: int) -> nn.GroupNorm:
    """GroupNorm32 of guided-diffusion: 32 groups, eps 1e-5 (computed in float32 there; we run float32)."""
    return nn.GroupNorm(32, channels)


class TimestepBlock(nn.Module):
    """A layer whose forward takes the timestep embedding as a second argument."""


class ContextBlock(nn.Module):
    """A layer whose forward takes a cross-attention context as a second argument (EGC's transformers)."""


class TimestepEmbedSequential(nn.Sequential):
    """nn.Sequential passing the embedding to TimestepBlocks and the context to ContextBlocks."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None) -> Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, ContextBlock):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest ×2, then a 3×3 convolution (`conv`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample(nn.Module):
    """A strided 3×3 convolution (`op`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """guided-diffusion's residual block, optionally up/down-sampling, with additive or scale-shift conditioning."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        # The resampling of a ResBlock is parameter-free (nearest ×2 or 2×2 average).
        self.resample_mode = "up" if up else "down" if down else None
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample_mode == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.avg_pool2d(x, kernel_size=2, stride=2)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.resample_mode is not None:
            # Resample between the activation and the convolution, the input alike.
            h = self.in_layers[2](self._resample(self.in_layers[1](self.in_layers[0](x))))
            x = self._resample(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def qkv_attention(qkv: Tensor, heads: int, legacy_order: bool) -> Tensor:
    """Dot-product attention over T positions of a (B, 3·C, T) tensor.

    guided-diffusion's two layouts: the legacy one splits heads first, then
    q/k/v within each head ((B·H, 3·c, T)); the new one splits q/k/v first.
    The 1/√c scale is applied as 1/c^¼ to q and to k, as the official code does.
    """
    batch, width, length = qkv.shape
    ch = width // (3 * heads)
    if legacy_order:
        q, k, v = qkv.reshape(batch * heads, 3 * ch, length).split(ch, dim=1)
    else:
        q, k, v = (part.reshape(batch * heads, ch, length) for part in qkv.chunk(3, dim=1))
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(batch, -1, length)


class AttentionBlock(nn.Module):
    """Self-attention over spatial positions: `norm`, `qkv` (1×1 Conv1d), `proj_out`."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, legacy_order: bool = True):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise UsageError(f"attention channels {channels} are not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise UsageError(f"attention channels {channels} are not divisible by {self.num_heads} heads")
        self.legacy_order = legacy_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, *spatial = x.shape
        flat = x.reshape(batch, channels, -1)
        h = qkv_attention(self.qkv(self.norm(flat)), self.num_heads, self.legacy_order)
        return (flat + self.proj_out(h)).reshape(batch, channels, *spatial)


# --- configuration ------------------------------------------------------------------------------

@dataclass(frozen=True)
class UNetConfig:
    """The constructor arguments of guided-diffusion's UNetModel (attention given as downsampling rates)."""

    in_channels: int = 3
    model_channels: int = 128
    out_channels: int = 3
    num_res_blocks: int = 2
    channel_mult: tuple[float, ...] = (1, 2, 2, 2)
    attention_ds: tuple[int, ...] = (2, 4)
    num_heads: int = 4
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False

    def channels(self, mult: float) -> int:
        return int(mult * self.model_channels)

    def heads_up(self) -> int:
        return self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample


Attention = Callable[[int, bool], nn.Module]  # (channels, upsampling path?) → attention layer


class UNetSkeleton(nn.Module):
    """The UNetModel layout; the attention layer at each attention resolution is supplied by the subclass."""

    def __init__(self, config: UNetConfig, attention: Attention):
        super().__init__()
        self.config = config
        mc = config.model_channels
        emb_dim = 4 * mc
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res(ch_in: int, ch_out: int, **kwargs: bool) -> ResBlock:
            return ResBlock(ch_in, emb_dim, ch_out, use_scale_shift_norm=config.use_scale_shift_norm, **kwargs)

        ch = input_ch = config.channels(config.channel_mult[0])
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(config.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        ds = 1
        levels = len(config.channel_mult)
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [res(ch, config.channels(mult))]
                ch = config.channels(mult)
                if ds in config.attention_ds:
                    layers.append(attention(ch, False))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                down = res(ch, ch, down=True) if config.resblock_updown else Downsample(ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attention(ch, False), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(config.channel_mult))[::-1]:
            for i in range(config.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), config.channels(mult))]
                ch = config.channels(mult)
                if ds in config.attention_ds:
                    layers.append(attention(ch, True))
                if level and i == config.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if config.resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(input_ch, config.out_channels, 3, padding=1))

    def embed_time(self, timesteps: Tensor) -> Tensor:
        return self.time_embed(timestep_embedding(timesteps, self.model_channels))

    def encode(self, x: Tensor, emb: Tensor, context: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """The down path: the middle block's output and every input block's output (the skips)."""
        skips = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            skips.append(h)
        return self.middle_block(h, emb, context), skips

    def decode(self, h: Tensor, skips: list[Tensor], emb: Tensor, context: Tensor | None = None) -> Tensor:
        """The up path from the middle features and the skips, through `out`."""
        skips = list(skips)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)


# --- inferring the configuration from a state dict ------------------------------------------------

def block_indices(state: Mapping[str, Tensor], prefix: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for key in state if (m := pattern.match(key))})


def _is_resblock(state: Mapping[str, Tensor], layer: str) -> bool:
    return f"{layer}.in_layers.2.weight" in state


def attention_kind(state: Mapping[str, Tensor], layer: str) -> str | None:
    """'attention' (AttentionBlock), 'transformer' (SpatialTransformer) or None."""
    if f"{layer}.qkv.weight" in state:
        return "attention"
    if f"{layer}.proj_in.weight" in state:
        return "transformer"
    return None


@dataclass(frozen=True)
class InferredLayout:
    """What the state dict's shapes say; `attention` is the attention layer kind found."""

    config: UNetConfig
    attention: str | None


def infer_unet_layout(state: Mapping[str, Tensor], what: str) -> InferredLayout:
    """Read the UNet's configuration from the shapes of its state dict.

    Recovers channels, channel multipliers, residual blocks per level,
    attention resolutions, scale-shift norm, ResBlock up/down-sampling, and
    in/out channels. It cannot see the number of attention heads nor the
    attention order: those keep the config's defaults. Raises
    ConfigInferenceError naming what is inconsistent.
    """

    def fail(reason: str) -> ConfigInferenceError:
        return ConfigInferenceError(
            f"cannot infer the {what} configuration from the checkpoint's shapes: {reason}. "
            f"Give the configuration with --model-config FILE.json (the official training flags, e.g. "
            f'{{"num_channels": 128, "num_res_blocks": 3, "channel_mult": "1,2,2,2", '
            f'"attention_resolutions": "16,8", "num_heads": 4}})'
        )

    for key in ("time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight", "middle_block.0.in_layers.2.weight"):
        if key not in state:
            raise fail(f"key '{key}' is missing (is this a guided-diffusion UNet state dict?)")
    mc = int(state["time_embed.0.weight"].shape[1])
    if state["time_embed.0.weight"].shape[0] != 4 * mc:
        raise fail(f"time_embed.0.weight has shape {tuple(state['time_embed.0.weight'].shape)}, not (4·C, C)")
    first_ch, in_channels = (int(d) for d in state["input_blocks.0.0.weight"].shape[:2])
    out_channels = int(state["out.2.weight"].shape[0])
    n_in = block_indices(state, "input_blocks")
    n_out = block_indices(state, "output_blocks")
    if n_in != list(range(len(n_in))) or n_out != list(range(len(n_out))) or len(n_in) != len(n_out):
        raise fail(
            f"input blocks {n_in[:3]}…({len(n_in)}) and output blocks ({len(n_out)}) do not form a UNet "
            f"(down/up-sampling without parameters is not supported)"
        )

    def up_layer(j: int) -> str | None:
        layers = block_indices(state, f"output_blocks.{j}")
        last = f"output_blocks.{j}.{layers[-1]}"
        if f"{last}.conv.weight" in state:
            return "conv"
        if len(layers) > 1 and _is_resblock(state, last):
            return "resblock"
        return None

    ups = [j for j in n_out if up_layer(j)]
    per_level = ups[0] + 1 if ups else len(n_out)
    levels = len(n_out) // per_level
    if per_level < 2 or len(n_out) % per_level or ups != [per_level * k + per_level - 1 for k in range(levels - 1)]:
        raise fail(f"upsampling layers in output blocks {ups} do not fall at the end of equal levels")
    num_res_blocks = per_level - 1
    kinds = {up_layer(j) for j in ups}
    if len(kinds) > 1:
        raise fail("the up-sampling layers mix convolutions and ResBlocks")
    resblock_updown = kinds == {"resblock"}

    mults: list[float] = []
    attention_ds: set[int] = set()
    kinds_found: set[str] = set()
    scale_shift: set[bool] = set()
    index, ds = 1, 1
    for level in range(levels):
        level_channels, level_attention = set(), set()
        for _ in range(num_res_blocks):
            layer = f"input_blocks.{index}.0"
            if not _is_resblock(state, layer):
                raise fail(f"input block {index} should be a ResBlock")
            out = int(state[f"{layer}.in_layers.2.weight"].shape[0])
            level_channels.add(out)
            scale_shift.add(int(state[f"{layer}.emb_layers.1.weight"].shape[0]) == 2 * out)
            kind = attention_kind(state, f"input_blocks.{index}.1")
            level_attention.add(kind is not None)
            if kind:
                kinds_found.add(kind)
            index += 1
        if len(level_channels) != 1 or len(level_attention) != 1:
            raise fail(f"level {level} mixes channel counts {sorted(level_channels)} or attention")
        channels = level_channels.pop()
        if channels * 2 % mc:
            raise fail(f"level {level} has {channels} channels, not a multiple of C/2 = {mc / 2:g}")
        mults.append(channels // mc if channels % mc == 0 else channels / mc)
        if level_attention.pop():
            attention_ds.add(ds)
        if level != levels - 1:
            layer = f"input_blocks.{index}.0"
            found = "resblock" if _is_resblock(state, layer) else "conv" if f"{layer}.op.weight" in state else None
            if found != ("resblock" if resblock_updown else "conv"):
                raise fail(f"input block {index} should down-sample like the output blocks up-sample")
            index += 1
            ds *= 2
    if index != len(n_in):
        raise fail(f"{len(n_in)} input blocks where {index} are expected")
    middle = attention_kind(state, "middle_block.1")
    if middle:
        kinds_found.add(middle)
    if len(kinds_found) > 1 or len(scale_shift) != 1:
        raise fail("attention layers of different kinds, or scale-shift norm in some blocks only")
    if int(mults[0] * mc) != first_ch:
        raise fail(f"the first convolution has {first_ch} channels, the first level {int(mults[0] * mc)}")
    config = UNetConfig(
        in_channels=in_channels,
        model_channels=mc,
        out_channels=out_channels,
        num_res_blocks=num_res_blocks,
        channel_mult=tuple(mults),
        attention_ds=tuple(sorted(attention_ds)),
        use_scale_shift_norm=scale_shift.pop(),
        resblock_updown=resblock_updown,
    )
    return InferredLayout(config, kinds_found.pop() if kinds_found else None)


# --- an explicit configuration (--model-config FILE.json) ------------------------------------------

# The official scripts' flag names that set the UNet (script_util.model_and_diffusion_defaults).
UNET_FLAGS = {
    "num_channels": "model_channels",
    "num_res_blocks": "num_res_blocks",
    "num_heads": "num_heads",
    "num_head_channels": "num_head_channels",
    "num_heads_upsample": "num_heads_upsample",
    "use_scale_shift_norm": "use_scale_shift_norm",
    "resblock_updown": "resblock_updown",
    "use_new_attention_order": "use_new_attention_order",
    "in_channels": "in_channels",
}


def _ints(value: Any, flag: str) -> tuple[float, ...]:
    items = value.split(",") if isinstance(value, str) else value
    try:
        return tuple(float(v) if float(v) != int(float(v)) else int(float(v)) for v in items)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--model-config: '{flag}' must be a list or a comma-separated string of numbers, got {value!r}") from error


def apply_flags(config: UNetConfig, options: Mapping[str, Any], image_size: int) -> UNetConfig:
    """Override `config` with the official flags that set the UNet (attention given as resolutions)."""
    unknown = set(options) - set(UNET_FLAGS) - {"channel_mult", "attention_resolutions", "learn_sigma", "image_size"}
    if unknown:
        raise UsageError(f"--model-config: unknown flags {sorted(unknown)}")
    updates: dict[str, Any] = {UNET_FLAGS[k]: v for k, v in options.items() if k in UNET_FLAGS}
    for name in ("model_channels", "num_res_blocks", "num_heads", "num_head_channels", "num_heads_upsample", "in_channels"):
        if name in updates:
            updates[name] = int(updates[name])
    for name in ("use_scale_shift_norm", "resblock_updown", "use_new_attention_order"):
        if name in updates and not isinstance(updates[name], bool):
            raise UsageError(f"--model-config: '{name}' must be true or false, got {updates[name]!r}")
    size = int(options.get("image_size", image_size))
    if options.get("channel_mult") not in (None, ""):
        updates["channel_mult"] = _ints(options["channel_mult"], "channel_mult")
    if "attention_resolutions" in options:
        # The official flag lists resolutions (16, 8 at 32×32); the network uses downsampling rates.
        resolutions = _ints(options["attention_resolutions"], "attention_resolutions") if options["attention_resolutions"] != "" else ()
        if any(not 1 <= r <= size for r in resolutions):  # guided-diffusion divides the image size by each
            raise UsageError(f"--model-config: 'attention_resolutions' {options['attention_resolutions']!r} must be "
                             f"resolutions from 1 to the image size {size}, such as 16,8 at 32")
        updates["attention_ds"] = tuple(sorted(size // int(r) for r in resolutions))
    config = replace(config, **updates)
    if "learn_sigma" in options:
        config = replace(config, out_channels=config.in_channels * (2 if options.get("learn_sigma") else 1))
    return config


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
