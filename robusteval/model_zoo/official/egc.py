"""The official EGC model (Guo et al. 2023, ICCV; GuoQiushan/EGC): EBMUNetModel over latent diffusion's KL-f8 autoencoder.

Files: the EBMUNet's plain state dict (`model*.pt`, `ema_*.pt`, the released
`256x256_EGC.pt`) and the autoencoder's (`autoencoder_kl.pth`, or latent
diffusion's KL-f8 `model.ckpt`), given separately (`--vae FILE`).

Under the JointModel contract (x in [0, 1], 256×256 RGB for the released
model):

- logits(x, σ): the official classification (`image_classification_eval.py`):
  z = 0.18215 · mean latent of the autoencoder on 2x − 1, then the network in
  `cls_mode` (null label) at t = 0. σ is not told to the network.
- energy(x): the network's energy of that latent at t = 0 with the null label,
  E(z) = −Σ_positions logsumexp_k f_k(z, 0, ∅). Its relation to densities: the
  network's ε̂ is ∇_z E, and ε̂ = −√(1 − ᾱ_t)·∇_z log p_t(z), so at t = 0
  E / √(1 − ᾱ_0) is −log p(z) of the *latent* up to a constant (no
  encoder-Jacobian term: it is not a pixel-space density). Only σ = 0 is
  defined: pixel noise has no counterpart in the latent diffusion.
- sample(n, y): the official sampler (`image_sample_cond_ldm_egc.py`): DDIM
  over 100 respaced steps in the latent, ε̂ from the label-conditioned energy,
  classifier guidance of scale 6 from the network's own cls_mode at t, no
  clipping; decoded by the autoencoder. Without labels: the null label, no guidance.
- no `denoise`: the noise of the diffusion lives in the latent; a pixel-space
  Tweedie denoiser cannot be defined from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from robusteval.core.checkpoints import CheckpointError, load_into, read_state_dict
from robusteval.core.errors import UsageError
from robusteval.core.interface import JointModel
from robusteval.data import DatasetInfo
from robusteval.model_zoo.official.egc_unet import (
    EBMUNetModel,
    EGCOptions,
    infer_egc_config,
)
from robusteval.model_zoo.official.flags import flag_schedule, model_config_options
from robusteval.model_zoo.official.guided_unet import UNetConfig
from robusteval.model_zoo.official.kl_autoencoder import (
    AutoencoderConfig,
    AutoencoderKL,
    autoencoder_state,
    infer_autoencoder_config,
)
from robusteval.model_zoo.official.schedule import (
    DiscreteSchedule,
    linear_betas,
    space_timesteps,
)

# The official commands (run_imagenet_egc_*.sh): linear β 0.00085 … 0.012 over 1,000 steps;
# sampling: DDIM, 100 steps, classifier scale 6; latents scaled by 0.18215.
OFFICIAL = {"diffusion_steps": 1000, "linear_start": 0.00085, "linear_end": 0.012, "scale_factor": 0.18215,
            "sample_steps": 100, "classifier_scale": 6.0}
# Flags read here beyond OFFICIAL's; what the shapes determine (channels, levels, attention) comes from the file.
READ_FLAGS = set(OFFICIAL) | {"num_heads", "num_head_channels", "pool", "timestep_respacing", "use_ddim", "noise_schedule",
                              "autoencoder_stride"}
# The autoencoder's downsampling the network's latents come from: latent diffusion's KL-f8 (flag autoencoder_stride).
OFFICIAL_STRIDE = 8
# The other flags of the official commands: accepted (a command's flags can be pasted) and ignored.
IGNORED_FLAGS = {
    "attention_resolutions", "class_cond", "dropout", "image_size", "learn_sigma", "num_channels", "num_res_blocks",
    "resblock_updown", "use_new_attention_order", "use_fp16", "use_scale_shift_norm", "batch_size", "channel_mult",
    "in_channels", "use_spatial_transformer", "context_dim", "transformer_depth", "model_path", "num_samples",
    "autoencoder_path", "val_data_dir", "lr", "weight_decay", "val_batch_size", "data_dir", "cls_data_dir", "ce_weight",
    "eval_interval", "save_interval", "label_smooth", "grad_clip", "cls_batch_size", "microbatch", "sample_z",
    "autoencoder_type", "double_z", "num_heads_upsample", "out_channels", "num_classes",
    "modeltype", "use_checkpoint", "clip_denoised", "save_png",
}


def sampler_options(options: Mapping[str, Any], steps: int) -> tuple[int, bool]:
    """(number of sampling steps, DDIM?) from sample_steps / the official timestep_respacing and use_ddim."""
    unknown = set(options) - READ_FLAGS - IGNORED_FLAGS
    if unknown:
        raise UsageError(f"--model-config: unknown flags {sorted(unknown)} for egc")
    ddim = bool(options.get("use_ddim", True))
    count = options.get("sample_steps", OFFICIAL["sample_steps"])
    respacing = str(options.get("timestep_respacing", ""))
    if respacing:
        ddim = respacing.startswith("ddim")
        try:
            count = int(respacing[4:] if ddim else respacing)
        except ValueError as error:
            raise UsageError(f"--model-config: timestep_respacing must be 'ddimN' or 'N', got {respacing!r}") from error
    return min(int(count), steps), ddim


class OfficialEGC(JointModel):
    """EGC under the JointModel contract (pixel images in, the latent model inside)."""

    capabilities = frozenset({"logits", "energy", "sample"})
    name = "egc"

    def __init__(
        self,
        net: EBMUNetModel,
        autoencoder: AutoencoderKL,
        info: DatasetInfo,
        schedule: DiscreteSchedule,
        scale_factor: float = OFFICIAL["scale_factor"],
        sample_steps: int = int(OFFICIAL["sample_steps"]),
        classifier_scale: float = OFFICIAL["classifier_scale"],
        ddim: bool = True,
    ):
        super().__init__()
        self.net = net
        self.autoencoder = autoencoder.requires_grad_(False)
        self.num_classes = info.num_classes
        self.input_shape = info.input_shape
        self.schedule = schedule
        self.scale_factor = scale_factor
        self.sample_steps = sample_steps
        self.classifier_scale = classifier_scale
        self.ddim = ddim

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c, h, w = self.input_shape
        down = self.autoencoder.downsampling
        return (self.autoencoder.config.embed_dim, h // down, w // down)

    # --- latent coordinates ---------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """z0 = scale_factor · mean latent of 2x − 1 (the official evaluation's latents, sample_z False)."""
        return self.scale_factor * self.autoencoder.encode_mean(2 * x - 1)

    def decode(self, z: Tensor) -> Tensor:
        """Pixels in [0, 1] of a latent z (scaled as `encode`'s)."""
        return ((self.autoencoder.decode(z / self.scale_factor) + 1) / 2).clamp(0.0, 1.0)

    def eps(self, z_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """ε̂(z_t, t, y) = ∇_z E(z_t, y), the official network output (y = None: the null label)."""
        return self.net(z_t, t, y)

    def score(self, z_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """∇_z log p_t(z_t | y) = −ε̂ / √(1 − ᾱ_t), the latent score the ε-parameterisation implies."""
        abar = self.schedule.alpha_bar(t).to(z_t.device, z_t.dtype).view(-1, 1, 1, 1)
        return -self.eps(z_t, t, y) / (1 - abar).sqrt()

    # --- the contract ---------------------------------------------------------------------------
    def _logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        z = self.encode(x)
        return self.net.classify(z, torch.zeros(x.shape[0], device=x.device))

    def _energy(self, x: Tensor, sigma: Tensor) -> Tensor:
        if bool((sigma > 0).any()):
            raise UsageError(
                "egc's energy is defined at sigma = 0 only: its diffusion noise lives in the autoencoder's latent, "
                "so pixel noise of std sigma has no matching diffusion time"
            )
        return self.net.energy(self.encode(x), torch.zeros(x.shape[0], device=x.device))

    def _sample(self, n: int, y: Tensor | None, generator: torch.Generator | None) -> Tensor:
        noise = torch.randn((n, *self.latent_shape), generator=generator, device=generator.device if generator else self.device)
        steps = space_timesteps(self.schedule.num_timesteps, self.sample_steps, self.ddim)

        def eps_fn(z_t: Tensor, t: Tensor) -> Tensor:
            eps = self.eps(z_t, t, y).detach()
            if y is None or self.classifier_scale == 0:
                return eps
            # guided-diffusion's condition_score: ε̂ − √(1 − ᾱ_t)·s·∇ log p(y | z_t), the classifier at t.
            with torch.enable_grad():
                z_in = z_t.detach().requires_grad_(True)
                log_p = F.log_softmax(self.net.classify(z_in, t), dim=-1).gather(1, y.view(-1, 1)).sum()
                grad = torch.autograd.grad(log_p, z_in)[0]
            abar = self.schedule.alpha_bar(t).to(z_t.device, z_t.dtype).view(-1, 1, 1, 1)
            return eps - (1 - abar).sqrt() * self.classifier_scale * grad

        z0 = self.schedule.reverse(eps_fn, noise.to(self.device), steps, self.ddim, clip_denoised=False, generator=generator)
        with torch.no_grad():
            return self.decode(z0)


def load_egc(
    info: DatasetInfo,
    checkpoint: str | Path,
    allow_unsafe_pickle: bool = False,
    vae: str | Path | None = None,
    model_config: str | Path | Mapping[str, Any] | None = None,
) -> OfficialEGC:
    """The official EGC model for data set `info` from its network file and its autoencoder file (`vae`).

    Both configurations are read from the files' shapes; `model_config` (JSON
    file or dict of the official flags) may set what shapes cannot: num_heads
    and num_head_channels of the transformers, pool, linear_start/linear_end,
    diffusion_steps, scale_factor, sample_steps, classifier_scale.
    """
    if vae is None:
        raise CheckpointError(
            "egc needs its autoencoder's file too: pass vae=<file> (CLI: --vae FILE), e.g. EGC's autoencoder_kl.pth "
            "or latent diffusion's KL-f8 model.ckpt"
        )
    options = model_config_options(model_config)
    sampler_options(options, 1000)  # reject unknown flags before reading any file
    if options.get("noise_schedule", "linear") != "linear":
        raise UsageError("--model-config: egc's official schedule is 'linear'; other schedules are not supported")
    schedule = _schedule(options)
    state = read_state_dict(checkpoint, allow_unsafe_pickle=allow_unsafe_pickle)
    config, egc_options = infer_egc_config(state, options)
    if egc_options.num_classes != info.num_classes:
        raise CheckpointError(
            f"checkpoint {checkpoint} classifies {egc_options.num_classes} classes; data set '{info.name}' has {info.num_classes}"
        )
    vae_state = autoencoder_state(read_state_dict(vae, allow_unsafe_pickle=allow_unsafe_pickle))
    vae_config = infer_autoencoder_config(vae_state)
    if vae_config.embed_dim != config.in_channels:
        raise CheckpointError(
            f"the autoencoder {vae} makes {vae_config.embed_dim}-channel latents; the network {checkpoint} takes "
            f"{config.in_channels} channels"
        )
    channels, height, width = info.input_shape
    stride, down = options.get("autoencoder_stride", OFFICIAL_STRIDE), 2 ** (len(vae_config.ch_mult) - 1)
    if down != stride:
        raise CheckpointError(
            f"the autoencoder {vae} downsamples by {down}; the network {checkpoint} works on latents downsampled by "
            f"{stride} (EGC's KL-f8 unless --model-config gives autoencoder_stride): {height}×{width} images would "
            f"give {height // down}×{width // down} latents instead of {height // stride}×{width // stride}"
        )
    factor = 2 ** (len(vae_config.ch_mult) - 1) * 2 ** (len(config.channel_mult) - 1)
    if channels != vae_config.in_channels or height % factor or width % factor:
        raise CheckpointError(
            f"data set '{info.name}' has {channels}×{height}×{width} images; this autoencoder and network need "
            f"{vae_config.in_channels}-channel images with sides divisible by {factor} (the released model: 3×256×256)"
        )
    net = EBMUNetModel(config, egc_options)
    load_into(net, state, str(checkpoint))
    autoencoder = AutoencoderKL(vae_config)
    load_into(autoencoder, vae_state, str(vae))
    sample_steps, ddim = sampler_options(options, schedule.num_timesteps)
    return OfficialEGC(
        net, autoencoder, info, schedule,
        scale_factor=float(options.get("scale_factor", OFFICIAL["scale_factor"])),
        sample_steps=sample_steps,
        classifier_scale=float(options.get("classifier_scale", OFFICIAL["classifier_scale"])),
        ddim=ddim,
    ).eval()


def _schedule(options: Mapping[str, Any]) -> DiscreteSchedule:
    """EGC's linear β schedule from the flags (the official command's values where not given)."""
    steps, start, end = (options.get(k, OFFICIAL[k]) for k in ("diffusion_steps", "linear_start", "linear_end"))
    return flag_schedule(linear_betas(steps, start, end),
                         f"diffusion_steps {steps}, linear_start {start:g} and linear_end {end:g}")


def build_egc(info: DatasetInfo) -> OfficialEGC:
    """The released ImageNet configuration (EBMUNet 384 channels over KL-f8) for `info`, random weights.

    543 M + 84 M parameters: about 2.5 GB of memory in float32.
    """
    config = UNetConfig(in_channels=4, model_channels=384, out_channels=info.num_classes, num_res_blocks=2,
                        channel_mult=(1, 2, 4), attention_ds=(1, 2, 4), num_heads=4, num_head_channels=64,
                        use_scale_shift_norm=False)
    net = EBMUNetModel(config, EGCOptions(num_classes=info.num_classes))
    schedule = DiscreteSchedule(linear_betas(1000, OFFICIAL["linear_start"], OFFICIAL["linear_end"]))
    return OfficialEGC(net, AutoencoderKL(AutoencoderConfig()), info, schedule).eval()


# --- what the model card says about this row ---------------------------------------------------------
DATASETS = ("imagenet",)
REPOSITORY = "https://github.com/GuoQiushan/EGC"
ARCHITECTURE = (
    "EBMUNetModel: guided-diffusion UNet on 4×32×32 latents with latent diffusion's spatial transformers "
    "(cross-attention on label_emb, whose last row is the null label), one output channel per class, "
    "parameter-free attention pooling (sattn); over latent diffusion's KL-f8 autoencoder. Sizes read from the files."
)
FORMAT = (
    "the EBMUNet's plain state dict (model*.pt, ema_*.pt, the released 256x256_EGC.pt: label_emb.weight, "
    "input_blocks.*, middle_block.*, output_blocks.*, out.*) and, with --vae, the autoencoder's (EGC's "
    "autoencoder_kl.pth, or latent diffusion's KL-f8 model.ckpt under state_dict: encoder.*, decoder.*, "
    "quant_conv.*, post_quant_conv.*; loss.* ignored)"
)
PREPROCESSING = "2x - 1, the autoencoder's mean latent × 0.18215, inside the model"
UNSETTLED = (
    "The official evaluation resizes to 256 and centre-crops 256×256 (extract_feat.py); robusteval's imagenet data "
    "set is RobustBench's 224 crop, on which the latent is 28×28 instead of 32×32: accuracy there is not the "
    "paper's protocol.",
    "logits(x, σ): the official cls_mode (null label) at t = 0 on the mean latent (sample_z False); σ is not told.",
    "energy(x) = −Σ_positions logsumexp_k f_k(z, 0, ∅), the network's own energy; ε̂ = ∇_z E, so E/√(1 − ᾱ_0) is "
    "−log p(z) of the latent up to a constant (no encoder Jacobian: not a pixel density). Defined at σ = 0 only.",
    "No denoise: the diffusion's noise lives in the latent; a pixel-space denoiser cannot be read off it.",
    "sample(): the official sampler's settings (DDIM over 100 respaced steps, classifier scale 6 with the "
    "network's own cls_mode at t, no clipping); without labels the null label and no guidance (the official "
    "sampler is always class-conditional).",
    "Transformer heads: shapes show only heads × head width (256); 4 × 64 as the official command unless "
    "--model-config gives num_heads / num_head_channels. Pooling: sattn unless the file has fc.0.qkv_proj (attn).",
    "The KL autoencoder is written in robusteval with latent diffusion's key names (diffusers' AutoencoderKL names "
    "its modules differently).",
)
