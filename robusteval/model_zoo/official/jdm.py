"""The official joint diffusion model (Deja, Trzciński & Tomczak 2023; KamilDeja/joint_diffusion).

guided-diffusion's UNetModel ε(x_t, t) with a classifier under the official
attribute name `clasifier`: the middle block's output and every input
block's output are average-pooled, concatenated with the timestep t, and
passed through dropout 0.7 → BatchNorm1d → Linear → LeakyReLU → dropout 0.7 →
BatchNorm1d → Linear. Files are the bare state dicts the official trainer
writes: `scripts/image_train.py` with `--train_with_classifier True`, whose
TrainLoop saves `model{step}_0.pt` (no EMA files; `classifier_train.py`
trains a separate classifier without `clasifier.*` keys).

Under the JointModel contract (x in [0, 1]; inside, (x − 0.5)/0.5):

- logits(x, σ): the classifier at t = 0 on the image as given, as the official
  evaluation runs it (the published CIFAR-10 model's classifier was trained on
  clean images only, `train_noised_classifier False`); σ is not told to it.
- denoise(x, σ): Tweedie from ε at the (fractional) timestep whose noise level
  matches pixel σ: x − σ·ε̂(√ᾱ·(2x − 1), t) with ᾱ = 1/(1 + 4σ²).
- sample(n, y): the reverse process (ancestral, or DDIM); with labels, the
  official conditional sampler: at every step the encoder features are moved
  along the classifier's gradient before the decoder runs.
- counterfactual(x, target): the images noised to an intermediate step and
  denoised with that feature-shifting conditional sampler towards the target.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robusteval.core.checkpoints import CheckpointError, load_into, read_state_dict
from robusteval.core.errors import UsageError
from robusteval.core.interface import JointModel
from robusteval.data import DatasetInfo
from robusteval.model_zoo.official.flags import flag_schedule, model_config_options
from robusteval.model_zoo.official.guided_unet import (
    AttentionBlock,
    ConfigInferenceError,
    UNetConfig,
    UNetSkeleton,
    apply_flags,
    infer_unet_layout,
)
from robusteval.model_zoo.official.schedule import (
    DiscreteSchedule,
    cosine_betas,
    jdm_linear_betas,
    space_timesteps,
)

logger = logging.getLogger(__name__)

# What the state dict cannot tell defaults to the official CIFAR-10 command
# (README of KamilDeja/joint_diffusion): 128 channels, 3 residual blocks,
# attention at 16 and 8, 4 heads, scale-shift norm, 1,000 linear steps.
OFFICIAL_CIFAR10 = {
    "num_channels": 128, "num_res_blocks": 3, "attention_resolutions": "16,8", "num_heads": 4,
    "num_head_channels": -1, "use_scale_shift_norm": True, "resblock_updown": False, "learn_sigma": False,
    "diffusion_steps": 1000, "noise_schedule": "linear",
}
# guided-diffusion's create_model: channel multipliers by image size when the flag is empty.
DEFAULT_CHANNEL_MULT = {28: (1, 2, 2), 32: (1, 2, 2, 2), 64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}
# Flags of the official command line that concern training only; accepted in --model-config and ignored.
TRAINING_FLAGS = {
    "dataset", "dropout", "lr", "batch_size", "schedule_sampler", "plot_interval", "save_interval", "class_cond",
    "skip_save", "gpu_id", "validation_interval", "num_steps", "skip_validation", "validate_on_train",
    "train_with_classifier", "train_noised_classifier", "eval_on_test_set", "classifier_loss_scaling", "use_kl",
    "microbatch", "ema_rate", "use_fp16", "use_checkpoint", "weight_decay", "num_classes", "experiment_name",
    "dataroot", "timestep_respacing", "model_name", "multi_label_classifier", "classifier_augmentation",
}
DIFFUSION_FLAGS = {"diffusion_steps", "noise_schedule", "predict_xstart", "rescale_timesteps"}
# The published commands' flags by name (--model-config preset:NAME): the diffusion a file cannot tell. CIFAR-10's
# command runs 1,000 linear steps, Fashion-MNIST's 500; the UNet's shapes are read from the file either way.
PRESET_PREFIX = "preset:"
PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": {"diffusion_steps": 1000, "noise_schedule": "linear"},
    "fashion-mnist": {"diffusion_steps": 500, "noise_schedule": "linear"},
}


def model_options(model_config: str | Path | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """--model-config as checked flags: a JSON file, a dict, or `preset:NAME` (see PRESETS); None when not given."""
    if model_config is None:
        return None
    if not isinstance(model_config, Mapping) and str(model_config).startswith(PRESET_PREFIX):
        name = str(model_config)[len(PRESET_PREFIX):]
        if name not in PRESETS:
            raise UsageError(f"--model-config {model_config}: jdm's presets are "
                             f"{', '.join(PRESET_PREFIX + k for k in PRESETS)}")
        return dict(PRESETS[name])
    return model_config_options(model_config)


# The official conditional sampler's default step on the features (image_sample_with_classifier.py, sampling_lr).
OFFICIAL_SAMPLING_LR = 1000.0


class Classifier(nn.Module):
    """The official classifier head (`clasifier`): pooled encoder features and t → logits."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.dropout_1 = nn.Dropout(0.7)
        self.bn_1 = nn.BatchNorm1d(in_features + 1)
        self.fc_1 = nn.Linear(in_features + 1, in_features // 2)
        self.dropout_2 = nn.Dropout(0.7)
        self.bn_2 = nn.BatchNorm1d(in_features // 2)
        self.fc_2 = nn.Linear(in_features // 2, num_classes)

    def forward(self, h: Tensor, skips: list[Tensor], t: Tensor) -> Tensor:
        # The official pools the middle map with AvgPool2d(k) on a k×k map and each skip with
        # AvgPool2d(its size): global averages, in that order, then t as a last feature.
        pooled = [h.mean(dim=(2, 3))] + [s.mean(dim=(2, 3)) for s in skips] + [t[:, None].to(h.dtype)]
        z = self.bn_1(self.dropout_1(torch.cat(pooled, dim=1)))
        z = F.leaky_relu(self.fc_1(z))
        return self.fc_2(self.bn_2(self.dropout_2(z)))


class JointDiffusionUNet(UNetSkeleton):
    """guided-diffusion's UNetModel with the joint-diffusion classifier `clasifier`."""

    def __init__(self, config: UNetConfig, num_classes: int):
        legacy = not config.use_new_attention_order

        def attention(channels: int, up: bool) -> nn.Module:
            heads = config.heads_up() if up else config.num_heads
            return AttentionBlock(channels, heads, config.num_head_channels, legacy_order=legacy)

        super().__init__(config, attention)
        self.clasifier = Classifier(self.feature_size(), num_classes)

    def feature_size(self) -> int:
        """Channels of the pooled features: the middle block's and every input block's output."""
        skips = []
        for block in self.input_blocks:
            convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
            skips.append(convs[-1].out_channels if convs else skips[-1])
        middle = self.middle_block[2].out_layers[3].out_channels
        return middle + sum(skips)

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        """ε̂ (and, with learned σ, the variance channels) of x_t at the integer-scale timesteps."""
        emb = self.embed_time(timesteps)
        h, skips = self.encode(x, emb)
        return self.decode(h, skips, emb)

    def classify(self, x: Tensor, timesteps: Tensor) -> Tensor:
        h, skips = self.encode(x, self.embed_time(timesteps))
        return self.clasifier(h, skips, timesteps)


def config_for(
    state: Mapping[str, Tensor], info: DatasetInfo, options: Mapping[str, Any] | None
) -> tuple[UNetConfig, dict[str, Any]]:
    """The UNet configuration (read from the shapes, then the flags of `options`) and the diffusion flags.

    Flags override what the shapes say (a contradiction then fails to load,
    naming the keys); without flags, what shapes cannot tell takes the
    official CIFAR-10 command's values.
    """
    options = dict(options or {})
    if options.get("predict_xstart") or options.get("rescale_timesteps"):
        raise UsageError("--model-config: predict_xstart and rescale_timesteps are not supported (the official commands use neither)")
    structural = {k: v for k, v in options.items() if k not in TRAINING_FLAGS | DIFFUSION_FLAGS}
    size = info.input_shape[1]
    try:
        layout = infer_unet_layout(state, "joint-diffusion UNet")
        if layout.attention not in (None, "attention"):
            raise ConfigInferenceError("the checkpoint has spatial transformers, not attention blocks: is it an EGC model?")
        config = apply_flags(replace(layout.config, num_heads=OFFICIAL_CIFAR10["num_heads"]), structural, size)
    except ConfigInferenceError:
        if not options:
            raise
        base = UNetConfig(
            in_channels=info.input_shape[0], out_channels=info.input_shape[0],
            channel_mult=DEFAULT_CHANNEL_MULT.get(size, (1, 2, 2, 2)),
        )
        defaults = {k: v for k, v in OFFICIAL_CIFAR10.items() if k not in DIFFUSION_FLAGS}
        config = apply_flags(base, {**defaults, **structural}, size)
    diffusion = {k: options.get(k, OFFICIAL_CIFAR10[k]) for k in ("diffusion_steps", "noise_schedule")}
    return config, diffusion


def make_schedule(diffusion: Mapping[str, Any]) -> DiscreteSchedule:
    steps = int(diffusion["diffusion_steps"])
    flags = f"diffusion_steps {steps} and noise_schedule {diffusion['noise_schedule']!r}"
    if diffusion["noise_schedule"] == "linear":
        return flag_schedule(jdm_linear_betas(steps), flags)
    if diffusion["noise_schedule"] == "cosine":
        return flag_schedule(cosine_betas(steps), flags)
    raise UsageError(f"noise_schedule must be 'linear' or 'cosine', got {diffusion['noise_schedule']!r}")


class OfficialJointDiffusion(JointModel):
    """The official joint diffusion model under the JointModel contract."""

    capabilities = frozenset({"logits", "denoise", "sample"})
    name = "jdm"

    def __init__(
        self,
        net: JointDiffusionUNet,
        info: DatasetInfo,
        schedule: DiscreteSchedule,
        sample_steps: int | None = None,
        ddim: bool = False,
        feature_step: float = OFFICIAL_SAMPLING_LR,
        clip_denoised: bool = True,
    ):
        super().__init__()
        self.net = net
        self.num_classes = info.num_classes
        self.input_shape = info.input_shape
        self.schedule = schedule
        self.sample_steps = sample_steps or schedule.num_timesteps
        self.ddim = ddim
        self.feature_step = feature_step
        self.clip_denoised = clip_denoised
        # Diffusion flags neither the file nor --model-config gave, and the values assumed (recorded in runs).
        self.assumed_config: dict[str, Any] | None = None

    # --- the network in diffusion coordinates ----------------------------------------------------
    def eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        """ε̂(x_t, t): the first C output channels (the rest, with learned σ, are variances)."""
        return self.net(x_t, t)[:, : self.input_shape[0]]

    def shifted_eps(self, x_t: Tensor, t: Tensor, y: Tensor, step: float) -> Tensor:
        """ε̂ after moving the encoder features by step·∇ log p(y | features), as the official conditional sampler.

        The gradients are those of the official `loss.backward()` on the middle
        output and on every skip (each the total derivative, through the later
        blocks too). Direction: towards y, as the paper states (z + α∇ log p);
        the official script adds +α·∇CE, see the model card.
        """
        emb = self.net.embed_time(t)
        with torch.enable_grad():
            h, skips = self.net.encode(x_t.detach().requires_grad_(True), emb)
            log_p = self.net.clasifier(h, skips, t).log_softmax(1).gather(1, y.view(-1, 1)).sum()
            grads = torch.autograd.grad(log_p, [h, *skips])
        h = (h + step * grads[0]).detach()
        skips = [(s + step * g).detach() for s, g in zip(skips, grads[1:])]
        with torch.no_grad():
            return self.net.decode(h, skips, emb)[:, : self.input_shape[0]]

    # --- the contract ------------------------------------------------------------------------------
    def _logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.net.classify((x - 0.5) / 0.5, torch.zeros(x.shape[0], device=x.device, dtype=x.dtype))

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        t = self.schedule.matched_timestep(sigma).to(x.device)
        scale = (1.0 / (1.0 + 4.0 * sigma**2)).sqrt().view(-1, 1, 1, 1)  # √ᾱ at the matched t
        eps = self.eps(scale * (x - 0.5) / 0.5, t)
        return x - sigma.view(-1, 1, 1, 1) * eps

    def _sample(self, n: int, y: Tensor | None, generator: torch.Generator | None) -> Tensor:
        shape = (n, *self.input_shape)
        noise = torch.randn(shape, generator=generator, device=generator.device if generator else self.device)
        steps = space_timesteps(self.schedule.num_timesteps, self.sample_steps, self.ddim)
        return self._reverse(noise.to(self.device), steps, y, self.feature_step, generator)

    def _reverse(
        self, x_t: Tensor, steps: list[int], y: Tensor | None, step: float, generator: torch.Generator | None
    ) -> Tensor:
        def eps_fn(x: Tensor, t: Tensor) -> Tensor:
            if y is None or step == 0:
                with torch.no_grad():
                    return self.eps(x, t)
            return self.shifted_eps(x, t, y, step)

        # The official conditional sampler does not clip its x0 predictions; guided-diffusion's image_sample does.
        clip = self.clip_denoised and (y is None or step == 0)
        x0 = self.schedule.reverse(eps_fn, x_t, steps, self.ddim, clip, generator)
        return ((x0 + 1) / 2).clamp(0.0, 1.0)

    def counterfactual(
        self,
        x: Tensor,
        target: Tensor | int,
        t_start: float = 0.3,
        guidance_scale: float | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """x changed to be classified as `target`: noised to step round(t_start·(T − 1)), then denoised
        by the feature-shifting conditional sampler (feature step `guidance_scale`, default the official
        sampling_lr) over `steps` respaced steps (default: every step)."""
        self._check(x, 0.0)
        target = torch.as_tensor(target, dtype=torch.long, device=x.device)
        if target.dim() == 0:
            target = target.expand(x.shape[0])
        if target.shape != (x.shape[0],) or bool(((target < 0) | (target >= self.num_classes)).any()):
            raise UsageError(f"target must be a class index or {x.shape[0]} class indices in [0, {self.num_classes})")
        if not 0.0 < t_start <= 1.0:
            raise UsageError(f"t_start must lie in (0, 1] (a fraction of the diffusion), got {t_start}")
        last = round(t_start * (self.schedule.num_timesteps - 1))
        visited = space_timesteps(last + 1, min(steps or last + 1, last + 1), self.ddim)
        noise = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device)
        x_t = self.schedule.q_sample((x - 0.5) / 0.5, visited[-1], noise.to(x.device, x.dtype))
        step = self.feature_step if guidance_scale is None else guidance_scale
        return self._reverse(x_t, visited, target, step, generator)


def load_jdm(
    info: DatasetInfo,
    checkpoint: str | Path,
    allow_unsafe_pickle: bool = False,
    model_config: str | Path | Mapping[str, Any] | None = None,
) -> OfficialJointDiffusion:
    """The official joint diffusion model for data set `info` from a file the official trainer wrote.

    The UNet's configuration is read from the file's shapes; `model_config`
    (a JSON file or dict of the official training flags) gives what shapes
    cannot (heads, attention order, diffusion steps, schedule) or, when the
    shapes cannot be read, the whole configuration.
    """
    options = model_options(model_config)  # checked before any file is read
    if (options or {}).get("image_size", info.input_shape[1]) != info.input_shape[1]:
        raise UsageError(f"--model-config: 'image_size' {options['image_size']} differs from the "
                         f"{info.input_shape[1]}×{info.input_shape[1]} images of data set '{info.name}'")
    make_schedule({k: (options or {}).get(k, OFFICIAL_CIFAR10[k]) for k in ("diffusion_steps", "noise_schedule")})
    state = read_state_dict(checkpoint, allow_unsafe_pickle=allow_unsafe_pickle)
    # kornia's augmentation pipeline (used in training only) may leave buffers under `augmentation.`.
    state = {k: v for k, v in state.items() if not k.startswith("augmentation.")}
    if "clasifier.fc_2.weight" not in state:
        raise CheckpointError(
            f"checkpoint {checkpoint} has no classifier head ('clasifier.fc_2.weight'): the jdm row needs a model "
            f"trained with --train_with_classifier True"
        )
    config, diffusion = config_for(state, info, options)
    if config.in_channels != info.input_shape[0]:
        raise CheckpointError(
            f"checkpoint {checkpoint} takes {config.in_channels}-channel images; data set '{info.name}' has "
            f"{info.input_shape[0]} channels"
        )
    size = info.input_shape[1]
    if size % 2 ** (len(config.channel_mult) - 1):
        raise CheckpointError(
            f"data set '{info.name}' has {size}×{size} images, which {len(config.channel_mult) - 1} down-samplings "
            f"of checkpoint {checkpoint} cannot halve evenly"
        )
    num_classes = int(state["clasifier.fc_2.weight"].shape[0])
    if num_classes != info.num_classes:
        raise CheckpointError(
            f"checkpoint {checkpoint} classifies {num_classes} classes; data set '{info.name}' has {info.num_classes}"
        )
    net = JointDiffusionUNet(config, num_classes)
    load_into(net, state, str(checkpoint))
    model = OfficialJointDiffusion(net, info, make_schedule(diffusion)).eval()
    missing = {k: v for k, v in diffusion.items() if k not in (options or {})}
    if missing:
        # The file does not hold its diffusion: say what is assumed (and record it: `assumed_config`), since
        # denoise:S reads the timestep of σ off this schedule.
        model.assumed_config = missing
        logger.warning("jdm: %s does not hold its diffusion and --model-config does not give %s; assuming the "
                       "official CIFAR-10 command's %s (the published Fashion-MNIST command: --model-config "
                       "preset:fashion-mnist, 500 steps)", checkpoint, " and ".join(missing),
                       ", ".join(f"{k} {v}" for k, v in missing.items()))
    return model


def build_jdm(info: DatasetInfo) -> OfficialJointDiffusion:
    """The official CIFAR command's network (128 channels, 3 blocks, attention at 16 and 8) for `info`, random weights."""
    size = info.input_shape[1]
    config = apply_flags(
        UNetConfig(in_channels=info.input_shape[0], out_channels=info.input_shape[0],
                   channel_mult=DEFAULT_CHANNEL_MULT.get(size, (1, 2, 2, 2))),
        {k: v for k, v in OFFICIAL_CIFAR10.items() if k not in DIFFUSION_FLAGS}, size,
    )
    return OfficialJointDiffusion(JointDiffusionUNet(config, info.num_classes), info, make_schedule(OFFICIAL_CIFAR10)).eval()


# --- what the model card says about this row ---------------------------------------------------------
# The data sets of the official dataloaders (dataloaders/base.py) that robusteval reads: all normalised (x - 0.5)/0.5,
# MNIST and FashionMNIST at 1×28×28 (its MNIST32 variant, 3×32×32, is not robusteval's mnist).
DATASETS = ("cifar10", "cifar100", "mnist", "fashion-mnist")
REPOSITORY = "https://github.com/KamilDeja/joint_diffusion"
ARCHITECTURE = (
    "guided-diffusion UNetModel ε(x_t, t) with the classifier head `clasifier` (global-average-pooled middle and "
    "input-block features + t → dropout 0.7, BatchNorm1d, Linear, LeakyReLU, dropout 0.7, BatchNorm1d, Linear); "
    "channels, multipliers, blocks, attention resolutions, scale-shift norm and up/down ResBlocks read from the file; "
    "ε-prediction, 1,000 linear steps"
)
FORMAT = (
    "a bare state dict as scripts/image_train.py's TrainLoop writes it (model{step}_0.pt; no EMA files): "
    "time_embed.*, input_blocks.*, middle_block.*, output_blocks.*, out.*, clasifier.{bn_1,fc_1,bn_2,fc_2}.*"
)
PREPROCESSING = "(x - 0.5) / 0.5 inside the model"
UNSETTLED = (
    "Noise schedule: joint_diffusion's get_named_beta_schedule makes its linear β run from 1e-3 (not "
    "guided-diffusion's 1e-4) to 0.02 over 1,000 steps; we follow the code.",
    "logits(x, σ) is the classifier at t = 0 for every σ, as the official evaluation runs it (the published "
    "classifier was trained on clean images only); σ is not told to it.",
    "denoise(x, σ): Tweedie from ε at the fractional t where ᾱ (interpolated linearly between integer steps) equals "
    "1/(1 + 4σ²); σ below the first step's level (≈ 0.0158) uses t = 0 with the true σ.",
    "Conditional sampling and counterfactuals move the encoder features by α·∇ log p(y | features) (towards y, "
    "as the paper writes it); the official script adds +sampling_lr·∇(cross-entropy), which as written moves away "
    "from y. Pass a negative guidance scale for the script's literal behaviour. Default α: the script's sampling_lr 1000.",
    "counterfactual(): the repository has no counterfactual script; ours noises x to step round(t_start·999) "
    "(t_start 0.3 by default) and runs that conditional sampler down to step 0.",
    "sample(): ancestral sampling with the 'fixed large' variance over all 1,000 steps (or DDIM); x0 predictions "
    "are clipped without labels (guided-diffusion's image_sample) and not with labels (the official conditional script).",
    "What shapes cannot tell — heads (4), attention order (legacy), diffusion steps (1,000), schedule (linear) — "
    "takes the CIFAR-10 command's values unless --model-config FILE.json gives the official flags.",
    "Files with learned σ (out channels 2·C): ε is the first C channels; the learned variance is not used.",
)
