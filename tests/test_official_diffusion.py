"""The official joint-diffusion UNet and EGC architectures: files in the official layout load as they are.

Synthetic checkpoints of small configurations are saved with the official
key names; the loaded models are compared with reference forwards written
here from the state dict alone (plain torch.nn.functional), so that a wrong
layer order, pooling, normalisation or attention layout is caught.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robusteval.core.checkpoints import CheckpointError
from robusteval.data import DatasetInfo
from robusteval.model_zoo.official.guided_unet import (
    ConfigInferenceError,
    UNetConfig,
    infer_unet_layout,
    parameter_count,
)
from robusteval.model_zoo.official.jdm import JointDiffusionUNet, build_jdm, load_jdm
from robusteval.model_zoo.official.schedule import (
    DiscreteSchedule,
    jdm_linear_betas,
    space_timesteps,
)

CIFAR_LIKE = DatasetInfo("cifar10", 10, (3, 32, 32), tuple(str(i) for i in range(10)))
SMALL = DatasetInfo("small", 10, (3, 16, 16), tuple(str(i) for i in range(10)))


def randomise(module: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for every parameter and BatchNorm statistic (official init zeroes some layers)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in module.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = value
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(value.shape, generator=generator)
        else:
            state[key] = 0.2 * torch.randn(value.shape, generator=generator)
    module.load_state_dict(state)
    return module.state_dict()


# --- a reference forward written from the state dict ----------------------------------------------

def ref_timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.tensor([10000 ** (-i / half) for i in range(half)], dtype=torch.float32)
    return torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)


def ref_linear(sd: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    return x @ sd[p + ".weight"].T + sd[p + ".bias"]


def ref_conv(sd: dict, p: str, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    w = sd[p + ".weight"]
    return F.conv2d(x, w, sd[p + ".bias"], stride=stride, padding=w.shape[-1] // 2)


def ref_group_norm(sd: dict, p: str, x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    b, c = x.shape[:2]
    g = x.reshape(b, 32, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + eps)
    shape = (1, c) + (1,) * (x.dim() - 2)
    return g.reshape(x.shape) * sd[p + ".weight"].view(shape) + sd[p + ".bias"].view(shape)


def ref_resblock(sd: dict, p: str, x: torch.Tensor, emb: torch.Tensor, resample: str | None = None) -> torch.Tensor:
    h = F.silu(ref_group_norm(sd, p + ".in_layers.0", x))
    if resample == "down":
        h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    elif resample == "up":
        h, x = F.interpolate(h, scale_factor=2.0), F.interpolate(x, scale_factor=2.0)
    h = ref_conv(sd, p + ".in_layers.2", h)
    e = ref_linear(sd, p + ".emb_layers.1", F.silu(emb))[:, :, None, None]
    if e.shape[1] == 2 * h.shape[1]:  # scale-shift norm
        scale, shift = e[:, : h.shape[1]], e[:, h.shape[1] :]
        h = ref_group_norm(sd, p + ".out_layers.0", h) * (1 + scale) + shift
    else:
        h = ref_group_norm(sd, p + ".out_layers.0", h + e)
    h = ref_conv(sd, p + ".out_layers.3", F.silu(h))
    skip = ref_conv(sd, p + ".skip_connection", x) if p + ".skip_connection.weight" in sd else x
    return skip + h


def ref_attention(sd: dict, p: str, x: torch.Tensor, heads: int) -> torch.Tensor:
    """guided-diffusion's legacy layout: per head, the channels are [q | k | v] blocks of the qkv output."""
    b, c, hh, ww = x.shape
    flat = x.reshape(b, c, -1)
    normed = ref_group_norm(sd, p + ".norm", flat)
    qkv = torch.einsum("oc,bct->bot", sd[p + ".qkv.weight"][:, :, 0], normed) + sd[p + ".qkv.bias"][:, None]
    ch = c // heads
    outs = []
    for head in range(heads):
        block = qkv[:, head * 3 * ch : (head + 1) * 3 * ch]
        q, k, v = block[:, :ch], block[:, ch : 2 * ch], block[:, 2 * ch :]
        weights = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
        outs.append(torch.einsum("bts,bcs->bct", weights, v))
    out = torch.einsum("oc,bct->bot", sd[p + ".proj_out.weight"][:, :, 0], torch.cat(outs, 1)) + sd[p + ".proj_out.bias"][:, None]
    return (flat + out).reshape(b, c, hh, ww)


def ref_multihead(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q kᵀ/√d) v per head of (b, n, heads·d) tensors, heads taking consecutive channel blocks."""
    d = q.shape[-1] // heads
    outs = []
    for head in range(heads):
        sl = slice(head * d, (head + 1) * d)
        weights = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), dim=-1)
        outs.append(weights @ v[..., sl])
    return torch.cat(outs, dim=-1)


def ref_transformer(sd: dict, p: str, x: torch.Tensor, context: torch.Tensor, heads: int) -> torch.Tensor:
    """latent diffusion's SpatialTransformer: GroupNorm(eps 1e-6), proj_in, [self-attn, cross-attn, GEGLU] blocks, proj_out."""
    b, c, hh, ww = x.shape
    tokens = ref_conv(sd, p + ".proj_in", ref_group_norm(sd, p + ".norm", x, eps=1e-6)).flatten(2).transpose(1, 2)
    depth = len({k.split(".")[len(p.split("."))+1] for k in sd if k.startswith(p + ".transformer_blocks.")})
    for d in range(depth):
        q = p + f".transformer_blocks.{d}"

        def ln(name, z):
            return F.layer_norm(z, z.shape[-1:], sd[f"{q}.{name}.weight"], sd[f"{q}.{name}.bias"], 1e-5)

        def attend(name, z, ctx):
            w = lambda n: sd[f"{q}.{name}.{n}.weight"]  # noqa: E731
            out = ref_multihead(z @ w("to_q").T, ctx @ w("to_k").T, ctx @ w("to_v").T, heads)
            return ref_linear(sd, f"{q}.{name}.to_out.0", out)

        normed = ln("norm1", tokens)
        tokens = attend("attn1", normed, normed) + tokens
        tokens = attend("attn2", ln("norm2", tokens), context) + tokens
        value, gate = ref_linear(sd, f"{q}.ff.net.0.proj", ln("norm3", tokens)).chunk(2, dim=-1)
        tokens = ref_linear(sd, f"{q}.ff.net.2", value * F.gelu(gate)) + tokens
    return x + ref_conv(sd, p + ".proj_out", tokens.transpose(1, 2).reshape(b, -1, hh, ww))


def ref_layer(sd: dict, p: str, h: torch.Tensor, emb: torch.Tensor, heads: int, resample: str | None,
              context: torch.Tensor | None = None) -> torch.Tensor:
    if p + ".in_layers.0.weight" in sd:
        return ref_resblock(sd, p, h, emb, resample)
    if p + ".qkv.weight" in sd:
        return ref_attention(sd, p, h, heads)
    if p + ".proj_in.weight" in sd:
        return ref_transformer(sd, p, h, context, heads)
    if p + ".op.weight" in sd:
        return ref_conv(sd, p + ".op", h, stride=2)
    if p + ".conv.weight" in sd:
        return ref_conv(sd, p + ".conv", F.interpolate(h, scale_factor=2.0))
    return ref_conv(sd, p, h)  # the first convolution


def ref_unet(sd: dict, x: torch.Tensor, t: torch.Tensor, heads: int, num_res_blocks: int,
             context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(output map, joint-diffusion classifier logits or None) of a UNet state dict with `num_res_blocks` per level."""
    mc = sd["time_embed.0.weight"].shape[1]
    emb = ref_linear(sd, "time_embed.2", F.silu(ref_linear(sd, "time_embed.0", ref_timestep_embedding(t, mc))))
    per_level = num_res_blocks + 1

    def block(prefix: str, h: torch.Tensor, resample_last: str | None = None) -> torch.Tensor:
        layers = sorted({int(k[len(prefix) + 1 :].split(".")[0]) for k in sd if k.startswith(prefix + ".")})
        for i in layers:
            h = ref_layer(sd, f"{prefix}.{i}", h, emb, heads, resample_last if i == layers[-1] else None, context)
        return h

    n_blocks = len({k.split(".")[1] for k in sd if k.startswith("input_blocks.")})
    levels = n_blocks // per_level
    skips, h = [], x
    for i in range(n_blocks):
        # Input blocks (L+1)·k for k ≥ 1 down-sample; output blocks (L+1)·k + L up-sample (but the last level's).
        down = i > 0 and i % per_level == 0
        h = block(f"input_blocks.{i}", h, "down" if down else None)
        skips.append(h)
    h = block("middle_block", h)
    middle = h
    features = torch.cat([middle.mean((2, 3))] + [s.mean((2, 3)) for s in skips] + [t[:, None]], 1)

    def bn(p: str, z: torch.Tensor) -> torch.Tensor:
        return (z - sd[p + ".running_mean"]) / torch.sqrt(sd[p + ".running_var"] + 1e-5) * sd[p + ".weight"] + sd[p + ".bias"]

    logits = None
    if "clasifier.fc_1.weight" in sd:
        z = F.leaky_relu(ref_linear(sd, "clasifier.fc_1", bn("clasifier.bn_1", features)), 0.01)
        logits = ref_linear(sd, "clasifier.fc_2", bn("clasifier.bn_2", z))
    for j in range(n_blocks):
        up = j % per_level == num_res_blocks and j // per_level < levels - 1
        h = block(f"output_blocks.{j}", torch.cat([h, skips.pop()], 1), "up" if up else None)
    out = ref_conv(sd, "out.2", F.silu(ref_group_norm(sd, "out.0", h)))
    return out, logits


# --- jdm ----------------------------------------------------------------------------------------

ONE_LEVEL = UNetConfig(model_channels=32, num_res_blocks=1, channel_mult=(1,), attention_ds=(1,), num_heads=4)
JDM_VARIANTS = {
    "one-level": ONE_LEVEL,
    "two-level-additive": UNetConfig(model_channels=32, num_res_blocks=2, channel_mult=(1, 2), attention_ds=(2,),
                                     use_scale_shift_norm=False, num_heads=4),
    "updown-learned-sigma": UNetConfig(model_channels=32, out_channels=6, num_res_blocks=1, channel_mult=(1, 1),
                                       attention_ds=(), resblock_updown=True, num_heads=4),
    "three-level": UNetConfig(model_channels=32, num_res_blocks=1, channel_mult=(1, 2, 3), attention_ds=(1, 4),
                              num_heads=4),
}


def save_jdm(tmp_path, config: UNetConfig, seed: int = 0, name: str = "model010000_0.pt") -> tuple:
    net = JointDiffusionUNet(config, 10)
    state = randomise(net, seed)
    path = tmp_path / name
    torch.save(state, path)  # the official trainer's th.save(state_dict)
    return path, state


def images(n: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_jdm_checkpoint_has_the_official_key_names(tmp_path):
    _, state = save_jdm(tmp_path, ONE_LEVEL)
    for key in ("clasifier.bn_1.running_mean", "clasifier.bn_1.weight", "clasifier.fc_1.weight", "clasifier.bn_2.running_var",
                "clasifier.fc_2.bias", "input_blocks.0.0.weight", "input_blocks.1.0.in_layers.0.weight",
                "input_blocks.1.0.emb_layers.1.weight", "input_blocks.1.0.out_layers.3.weight", "input_blocks.1.1.qkv.weight",
                "input_blocks.1.1.proj_out.weight", "middle_block.1.norm.weight", "middle_block.2.out_layers.0.bias",
                "output_blocks.1.0.skip_connection.weight", "time_embed.0.weight", "time_embed.2.bias", "out.2.weight"):
        assert key in state, key


def test_jdm_full_size_feature_width_is_the_official_one():
    # The official Classifier sizes its input as num_channels·29 at 32×32 (·21 at 28×28).
    with torch.device("meta"):  # shapes only: nothing is allocated
        cifar = JointDiffusionUNet(UNetConfig(model_channels=128, num_res_blocks=3, channel_mult=(1, 2, 2, 2), attention_ds=(2, 4)), 10)
    assert cifar.feature_size() == 128 * 29
    with torch.device("meta"):
        fashion = JointDiffusionUNet(UNetConfig(in_channels=1, out_channels=1, model_channels=64, num_res_blocks=3,
                                                channel_mult=(1, 2, 2), attention_ds=(2, 4)), 10)
    assert fashion.feature_size() == 64 * 21


@pytest.mark.parametrize("variant", sorted(JDM_VARIANTS))
def test_jdm_config_inference_recovers_each_small_variant(variant):
    config = JDM_VARIANTS[variant]
    layout = infer_unet_layout(JointDiffusionUNet(config, 10).state_dict(), "test")
    assert layout.config == config
    assert layout.attention == "attention"  # the middle block always has one


def test_jdm_logits_and_eps_equal_the_reference_forward(tmp_path):
    path, state = save_jdm(tmp_path, ONE_LEVEL)
    model = load_jdm(SMALL, path)
    assert not model.training
    x = images(size=16)
    _, ref_logits = ref_unet(state, (x - 0.5) / 0.5, torch.zeros(3), heads=4, num_res_blocks=1)
    with torch.no_grad():
        logits = model.logits(x)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    t = torch.tensor([0.0, 17.0, 640.5])
    x_t = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    ref_out, _ = ref_unet(state, x_t, t, heads=4, num_res_blocks=1)
    with torch.no_grad():
        torch.testing.assert_close(model.eps(x_t, t), ref_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["two-level-additive", "updown-learned-sigma", "three-level"])
def test_jdm_variants_load_and_match_the_reference(tmp_path, variant):
    config = JDM_VARIANTS[variant]
    path, state = save_jdm(tmp_path, config, seed=3)
    model = load_jdm(CIFAR_LIKE, path)
    x = images(2)
    ref_out, ref_logits = ref_unet(state, (x - 0.5) / 0.5, torch.zeros(2), heads=4, num_res_blocks=config.num_res_blocks)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(x), ref_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.eps((x - 0.5) / 0.5, torch.zeros(2)), ref_out[:, :3], atol=1e-5, rtol=1e-5)


def test_jdm_fashion_mnist_layout_loads(tmp_path):
    # The official FashionMNIST command: one channel, 28×28, channel_mult (1, 2, 2) → 28, 14, 7.
    config = UNetConfig(in_channels=1, out_channels=1, model_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2),
                        attention_ds=(1,))
    path, state = save_jdm(tmp_path, config, seed=7)
    model = load_jdm(DatasetInfo("fashion-mnist", 10, (1, 28, 28), tuple(map(str, range(10)))), path)
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    _, ref_logits = ref_unet(state, (x - 0.5) / 0.5, torch.zeros(2), heads=4, num_res_blocks=1)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(x), ref_logits, atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_input_and_eval_is_deterministic(tmp_path):
    path, _ = save_jdm(tmp_path, ONE_LEVEL)
    jdm = load_jdm(SMALL, path)
    net_path, _, vae_path, _ = save_egc(tmp_path)
    egc = load_egc(IMAGES_16, net_path, vae=vae_path, model_config=TINY_FLAGS)
    for model, fns in ((jdm, (lambda x: jdm.logits(x), lambda x: jdm.denoise(x, 0.25))),
                       (egc, (lambda x: egc.logits(x), lambda x: egc.energy(x)))):
        for fn in fns:
            x = images(2, size=16).requires_grad_(True)
            out = fn(x)
            grad, = torch.autograd.grad(out.sum(), x)
            assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
            torch.testing.assert_close(fn(x.detach()), out.detach())  # dropout and BatchNorm in eval mode


def test_jdm_heads_come_from_the_model_config_when_shapes_cannot_tell(tmp_path):
    config = UNetConfig(model_channels=64, num_res_blocks=1, channel_mult=(1,), attention_ds=(1,), num_heads=2)
    path, state = save_jdm(tmp_path, config, seed=4)
    x = images(2)
    _, ref_logits = ref_unet(state, (x - 0.5) / 0.5, torch.zeros(2), heads=2, num_res_blocks=1)
    with torch.no_grad():
        default_heads = load_jdm(CIFAR_LIKE, path).logits(x)  # 4 heads, the official command's
        assert (default_heads - ref_logits).abs().max() > 1e-4
        flags = tmp_path / "flags.json"
        flags.write_text(json.dumps({"num_heads": 2, "lr": 1e-4, "dataset": "CIFAR10"}))
        torch.testing.assert_close(load_jdm(CIFAR_LIKE, path, model_config=flags).logits(x), ref_logits, atol=1e-5, rtol=1e-5)


def test_jdm_config_inference_fails_clearly_and_the_model_config_rescues(tmp_path):
    config = UNetConfig(model_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_ds=())
    net = JointDiffusionUNet(config, 10)
    state = randomise(net, 5)
    # A file whose up-sampling layer is not where the levels put it: no UNet layout fits.
    broken = {k.replace("output_blocks.1.1.conv", "output_blocks.0.1.conv"): v for k, v in state.items()}
    with pytest.raises(ConfigInferenceError, match="--model-config"):
        infer_unet_layout(broken, "joint-diffusion UNet")
    path = tmp_path / "broken.pt"
    torch.save(broken, path)
    with pytest.raises(ConfigInferenceError, match="--model-config"):
        load_jdm(CIFAR_LIKE, path)
    # The explicit configuration builds the network; the file still does not fit, and the error names keys.
    flags = {"num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2", "attention_resolutions": ""}
    with pytest.raises(CheckpointError, match="output_blocks"):
        load_jdm(CIFAR_LIKE, path, model_config=flags)
    # The same flags load the intact file.
    good = tmp_path / "good.pt"
    torch.save(state, good)
    assert load_jdm(CIFAR_LIKE, good, model_config=flags).net.config.channel_mult == (1, 2)


def test_jdm_bad_inputs_are_refused_clearly(tmp_path):
    path, state = save_jdm(tmp_path, ONE_LEVEL)
    gray = DatasetInfo("mnist", 10, (1, 28, 28), tuple(str(i) for i in range(10)))
    with pytest.raises(CheckpointError, match="3-channel"):
        load_jdm(gray, path)
    headless = tmp_path / "headless.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith("clasifier.")}, headless)
    with pytest.raises(CheckpointError, match="clasifier"):
        load_jdm(CIFAR_LIKE, headless)
    with pytest.raises(ValueError, match="unknown flags"):
        load_jdm(CIFAR_LIKE, path, model_config={"num_chanels": 32})


def test_jdm_schedule_is_the_official_linear_one():
    betas = jdm_linear_betas(1000)
    assert betas[0] == pytest.approx(1e-3) and betas[-1] == pytest.approx(0.02) and len(betas) == 1000
    assert jdm_linear_betas(500)[0] == pytest.approx(2e-3) and jdm_linear_betas(500)[-1] == pytest.approx(0.04)
    schedule = DiscreteSchedule(betas)
    assert float(schedule.alphas_cumprod[10]) == pytest.approx(np.prod(1 - betas[:11]), rel=1e-12)


def test_matched_timestep_inverts_the_noise_level():
    schedule = DiscreteSchedule(jdm_linear_betas(1000))
    abar = schedule.alphas_cumprod
    k = torch.tensor([0, 1, 37, 500, 998, 999])
    sigma = torch.sqrt((1 / abar[k] - 1) / 4).float()
    torch.testing.assert_close(schedule.matched_timestep(sigma), k.float(), atol=2e-3, rtol=0)
    # Between steps: ᾱ interpolated linearly at the fractional t equals 1/(1 + 4σ²).
    target = 0.3 * abar[100] + 0.7 * abar[101]
    sigma_mid = torch.sqrt((1 / target - 1) / 4).reshape(1).float()
    t = schedule.matched_timestep(sigma_mid)
    assert float(t) == pytest.approx(100.7, abs=1e-3)
    assert float(schedule.matched_timestep(torch.zeros(1))) == 0.0
    assert float(schedule.matched_timestep(torch.tensor([1e4]))) == 999.0


def test_jdm_denoise_is_tweedie_from_eps_at_the_matched_timestep(tmp_path):
    path, state = save_jdm(tmp_path, ONE_LEVEL)
    model = load_jdm(SMALL, path)
    abar = model.schedule.alphas_cumprod
    x0 = images(2, size=16)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    for t_exact in (50.0, 50.25):
        low = int(t_exact)
        a = float((1 - (t_exact - low)) * abar[low] + (t_exact - low) * abar[low + 1])
        sigma = math.sqrt((1 / a - 1) / 4)
        x = x0 + sigma * noise
        with torch.no_grad():
            denoised = model.denoise(x, sigma)
        # The same state in the model's coordinates: √ᾱ·(2x − 1) = √ᾱ·x0' + √(1 − ᾱ)·noise.
        x_t = math.sqrt(a) * (2 * x - 1)
        torch.testing.assert_close(x_t, math.sqrt(a) * (2 * x0 - 1) + math.sqrt(1 - a) * noise, atol=1e-5, rtol=0)
        eps, _ = ref_unet(state, x_t, torch.full((2,), t_exact), heads=4, num_res_blocks=1)
        # Tweedie in [-1, 1] units, mapped back to pixels.
        x0_internal = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
        torch.testing.assert_close(denoised, (x0_internal + 1) / 2, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.denoise(x0, 0.0), x0)


def test_reverse_process_recovers_a_known_point():
    # With the exact ε of a one-point data distribution, DDPM and DDIM both end exactly on the point.
    schedule = DiscreteSchedule(jdm_linear_betas(100))
    point = torch.linspace(-0.9, 0.9, 12).reshape(1, 3, 2, 2)

    def exact_eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = schedule.alphas_cumprod[t.long()].float().view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * point) / (1 - a).sqrt()

    start = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    for ddim in (False, True):
        steps = space_timesteps(100, 10, ddim)
        out = schedule.reverse(exact_eps, start, steps, ddim, clip_denoised=False, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(out, point.expand(2, -1, -1, -1), atol=1e-4, rtol=0)
    assert space_timesteps(1000, 4, ddim=False) == [0, 333, 666, 999]
    assert space_timesteps(1000, 4, ddim=True) == [0, 250, 500, 750]


def test_jdm_sample_and_counterfactual_run(tmp_path):
    path, _ = save_jdm(tmp_path, ONE_LEVEL)
    model = load_jdm(SMALL, path)
    model.sample_steps = 3
    samples = model.sample(2, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 3, 16, 16) and float(samples.min()) >= 0 and float(samples.max()) <= 1
    conditional = model.sample(2, y=torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0))
    assert conditional.shape == (2, 3, 16, 16) and not torch.equal(conditional, samples)
    x = images(2, size=16)
    changed = model.counterfactual(x, 3, t_start=0.05, steps=4, generator=torch.Generator().manual_seed(0))
    assert changed.shape == x.shape and float(changed.min()) >= 0 and float(changed.max()) <= 1
    # A zero feature step is the unconditional reverse process from the same noised image.
    plain = model.counterfactual(x, 3, t_start=0.05, steps=4, guidance_scale=0.0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(changed, plain)
    with pytest.raises(ValueError, match="t_start"):
        model.counterfactual(x, 3, t_start=1.5)


def test_jdm_feature_shift_moves_towards_the_target(tmp_path):
    path, _ = save_jdm(tmp_path, ONE_LEVEL)
    model = load_jdm(SMALL, path)
    net = model.net
    x_t, t, y = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3)), torch.full((4,), 40.0), torch.tensor([0, 1, 2, 3])
    emb = net.embed_time(t)
    with torch.enable_grad():
        h, skips = net.encode(x_t.requires_grad_(True), emb)
        log_p = net.clasifier(h, skips, t).log_softmax(1).gather(1, y[:, None])
        grads = torch.autograd.grad(log_p.sum(), [h, *skips])
    with torch.no_grad():
        # Pooling over every position makes the per-element gradients small: the official step is 1,000.
        step = 100.0
        for sign in (1, -1):
            moved = net.clasifier(h + sign * step * grads[0], [s + sign * step * g for s, g in zip(skips, grads[1:])], t)
            gain = moved.log_softmax(1).gather(1, y[:, None]) - log_p
            assert bool((sign * gain > 1e-3).all())
        # shifted_eps decodes exactly those moved features.
        expected = net.decode(h + step * grads[0], [s + step * g for s, g in zip(skips, grads[1:])], emb)
        torch.testing.assert_close(model.shifted_eps(x_t.detach(), t, y, step), expected, atol=1e-5, rtol=1e-5)


# --- full-size parameter counts, computed from the official definitions ----------------------------

def official_unet_count(in_ch, mc, out_ch, nrb, mult, attn_ds, scale_shift, updown=False) -> int:
    """Parameters of guided-diffusion's UNetModel, counted layer by layer from its constructor."""
    emb = 4 * mc

    def gn(c):
        return 2 * c

    def conv(ci, co, k):
        return ci * co * k * k + co

    def res(ci, co):
        return gn(ci) + conv(ci, co, 3) + (emb * (2 * co if scale_shift else co) + (2 * co if scale_shift else co)) \
            + gn(co) + conv(co, co, 3) + (0 if ci == co else conv(ci, co, 1))

    def attn(c):
        return gn(c) + (c * 3 * c + 3 * c) + (c * c + c)

    total = (mc * emb + emb) + (emb * emb + emb)
    ch = int(mult[0] * mc)
    total += conv(in_ch, ch, 3)
    chans, ds = [ch], 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            total += res(ch, int(m * mc))
            ch = int(m * mc)
            total += attn(ch) if ds in attn_ds else 0
            chans.append(ch)
        if level != len(mult) - 1:
            total += res(ch, ch) if updown else conv(ch, ch, 3)
            chans.append(ch)
            ds *= 2
    total += 2 * res(ch, ch) + attn(ch)
    for level, m in list(enumerate(mult))[::-1]:
        for i in range(nrb + 1):
            total += res(ch + chans.pop(), int(m * mc))
            ch = int(m * mc)
            total += attn(ch) if ds in attn_ds else 0
            if level and i == nrb:
                total += res(ch, ch) if updown else conv(ch, ch, 3)
                ds //= 2
    return total + gn(ch) + conv(int(mult[0] * mc), out_ch, 3)


def official_jdm_classifier_count(in_features: int, classes: int) -> int:
    return 2 * (in_features + 1) + (in_features + 1) * (in_features // 2) + in_features // 2 \
        + 2 * (in_features // 2) + (in_features // 2) * classes + classes


def test_jdm_full_size_parameter_counts_match_the_official_definition():
    with torch.device("meta"):  # shapes only: nothing is allocated
        _check_jdm_full_size_counts()


def _check_jdm_full_size_counts():
    # The CIFAR-10 command: --num_channels 128 --num_res_blocks 3, attention at 16, 8; image size 32.
    cifar = JointDiffusionUNet(UNetConfig(model_channels=128, num_res_blocks=3, channel_mult=(1, 2, 2, 2), attention_ds=(2, 4)), 10)
    published = build_jdm(CIFAR_LIKE)  # what create_model builds without a file
    assert published.net.config == cifar.config and published.schedule.num_timesteps == 1000
    expected = official_unet_count(3, 128, 3, 3, (1, 2, 2, 2), (2, 4), True) + official_jdm_classifier_count(128 * 29, 10)
    assert parameter_count(cifar) == expected == 59_465_871
    cifar100 = JointDiffusionUNet(UNetConfig(model_channels=128, num_res_blocks=3, channel_mult=(1, 2, 2, 2), attention_ds=(2, 4)), 100)
    assert parameter_count(cifar100) == official_unet_count(3, 128, 3, 3, (1, 2, 2, 2), (2, 4), True) \
        + official_jdm_classifier_count(128 * 29, 100)
    # The FashionMNIST command: 64 channels, 28×28, channel_mult (1, 2, 2), attention at 16 and 8 → 28 // 16 = 1, 28 // 8 = 3.
    fashion = JointDiffusionUNet(UNetConfig(in_channels=1, out_channels=1, model_channels=64, num_res_blocks=3,
                                            channel_mult=(1, 2, 2), attention_ds=(1, 3)), 10)
    assert parameter_count(fashion) == official_unet_count(1, 64, 1, 3, (1, 2, 2), (1, 3), True) \
        + official_jdm_classifier_count(64 * 21, 10)


# --- egc ------------------------------------------------------------------------------------------

from robusteval.model_zoo.official.egc import build_egc, load_egc  # noqa: E402
from robusteval.model_zoo.official.egc_unet import (  # noqa: E402
    EBMUNetModel,
    EGCOptions,
    infer_egc_config,
)
from robusteval.model_zoo.official.kl_autoencoder import (  # noqa: E402
    AutoencoderConfig,
    AutoencoderKL,
    infer_autoencoder_config,
)

TINY_EGC = UNetConfig(in_channels=4, model_channels=32, out_channels=10, num_res_blocks=1, channel_mult=(1, 2),
                      attention_ds=(1, 2), num_heads=2, num_head_channels=16, use_scale_shift_norm=False)
TINY_EGC_OPTIONS = EGCOptions(num_classes=10, context_dim=16, transformer_depth=1, transformer_heads=2,
                              transformer_head_channels=16, pool="sattn")
TINY_VAE = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), z_channels=4, embed_dim=4)
# The tiny autoencoder downsamples by 2 (the released one by 8, the default of autoencoder_stride).
TINY_FLAGS = {"num_heads": 2, "autoencoder_stride": 2}
IMAGES_16 = DatasetInfo("tiny-imagenet-like", 10, (3, 16, 16), tuple(str(i) for i in range(10)))


def save_egc(tmp_path, config=TINY_EGC, options=TINY_EGC_OPTIONS, vae=TINY_VAE, seed=0, ldm_ckpt=False):
    net = EBMUNetModel(config, options)
    state = randomise(net, seed)
    net_path = tmp_path / "ema_0.9999_010000.pt"
    torch.save(state, net_path)
    autoencoder = AutoencoderKL(vae)
    vae_state = randomise(autoencoder, seed + 1)
    vae_path = tmp_path / ("model.ckpt" if ldm_ckpt else "autoencoder_kl.pth")
    if ldm_ckpt:  # latent diffusion's checkpoint: the weights under state_dict, beside the training loss's
        torch.save({"state_dict": {**vae_state, "loss.logvar": torch.zeros(())}, "global_step": 1}, vae_path)
    else:
        torch.save(vae_state, vae_path)
    return net_path, state, vae_path, vae_state


def ref_encode_mean(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """latent diffusion's Encoder + quant_conv → the mean half of the moments."""

    def resnet(p, h):
        out = ref_conv(sd, p + ".conv1", F.silu(ref_group_norm(sd, p + ".norm1", h, eps=1e-6)))
        out = ref_conv(sd, p + ".conv2", F.silu(ref_group_norm(sd, p + ".norm2", out, eps=1e-6)))
        return (ref_conv(sd, p + ".nin_shortcut", h) if p + ".nin_shortcut.weight" in sd else h) + out

    def attn(p, h):
        b, c, hh, ww = h.shape
        n = ref_group_norm(sd, p + ".norm", h, eps=1e-6)
        q, k, v = (ref_conv(sd, f"{p}.{m}", n).flatten(2).transpose(1, 2) for m in "qkv")
        out = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1) @ v
        return h + ref_conv(sd, p + ".proj_out", out.transpose(1, 2).reshape(b, c, hh, ww))

    h = ref_conv(sd, "encoder.conv_in", x)
    levels = len({k.split(".")[2] for k in sd if k.startswith("encoder.down.")})
    for i in range(levels):
        blocks = len({k.split(".")[4] for k in sd if k.startswith(f"encoder.down.{i}.block.")})
        for j in range(blocks):
            h = resnet(f"encoder.down.{i}.block.{j}", h)
            if f"encoder.down.{i}.attn.{j}.q.weight" in sd:
                h = attn(f"encoder.down.{i}.attn.{j}", h)
        if f"encoder.down.{i}.downsample.conv.weight" in sd:
            h = F.conv2d(F.pad(h, (0, 1, 0, 1)), sd[f"encoder.down.{i}.downsample.conv.weight"],
                         sd[f"encoder.down.{i}.downsample.conv.bias"], stride=2)
    h = resnet("encoder.mid.block_2", attn("encoder.mid.attn_1", resnet("encoder.mid.block_1", h)))
    h = ref_conv(sd, "encoder.conv_out", F.silu(ref_group_norm(sd, "encoder.norm_out", h, eps=1e-6)))
    moments = ref_conv(sd, "quant_conv", h)
    return moments[:, : moments.shape[1] // 2]


def ref_sattn_pool(out_map: torch.Tensor) -> torch.Tensor:
    """The mean token attends over [mean token, every position] with q = k = v, one head of all C channels."""
    tokens = out_map.flatten(2)
    tokens = torch.cat([tokens.mean(-1, keepdim=True), tokens], dim=-1)  # (b, C, 1 + hw)
    weights = torch.softmax((tokens[:, :, :1] * tokens).sum(1) / math.sqrt(tokens.shape[1]), dim=-1)  # (b, 1 + hw)
    return (tokens * weights[:, None, :]).sum(-1)


def test_egc_checkpoints_have_the_official_key_names(tmp_path):
    _, state, _, vae_state = save_egc(tmp_path)
    for key in ("label_emb.weight", "input_blocks.0.0.weight", "input_blocks.1.0.in_layers.2.weight",
                "input_blocks.1.1.proj_in.weight", "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
                "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight", "input_blocks.1.1.transformer_blocks.0.norm3.bias",
                "input_blocks.2.0.op.weight", "middle_block.1.proj_out.weight", "output_blocks.1.2.conv.weight", "out.2.weight"):
        assert key in state, key
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q.bias" not in state
    assert state["label_emb.weight"].shape == (11, 16)  # num_classes + 1: the null label
    for key in ("encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "encoder.down.0.downsample.conv.weight",
                "encoder.down.1.block.0.nin_shortcut.weight", "encoder.down.1.attn.0.q.weight", "encoder.mid.attn_1.proj_out.weight",
                "encoder.norm_out.weight", "quant_conv.weight", "post_quant_conv.weight", "decoder.up.1.upsample.conv.weight",
                "decoder.up.0.block.1.conv2.weight", "decoder.mid.block_1.norm1.weight", "decoder.conv_out.weight"):
        assert key in vae_state, key


def test_egc_config_inference_recovers_the_small_variants():
    for config, options in ((TINY_EGC, TINY_EGC_OPTIONS),
                            (replace(TINY_EGC, channel_mult=(1,), attention_ds=(1,), num_res_blocks=2, use_scale_shift_norm=True,
                                     num_heads=4, num_head_channels=8),
                             replace(TINY_EGC_OPTIONS, transformer_heads=4, transformer_head_channels=8, transformer_depth=2,
                                     pool="attn"))):
        state = EBMUNetModel(config, options).state_dict()
        flags = {"num_heads": options.transformer_heads}
        assert infer_egc_config(state, flags) == (config, options)
    for vae in (TINY_VAE, AutoencoderConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=2, attn_levels=(), z_channels=3, embed_dim=3)):
        assert infer_autoencoder_config(AutoencoderKL(vae).state_dict()) == vae


def test_egc_inference_fails_clearly_on_other_files(tmp_path):
    jdm_state = JointDiffusionUNet(ONE_LEVEL, 10).state_dict()
    with pytest.raises(ConfigInferenceError, match="not an EGC"):
        infer_egc_config(jdm_state)
    with pytest.raises(ConfigInferenceError, match="latent-diffusion layout"):
        infer_autoencoder_config({"first_stage_model.encoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(ConfigInferenceError, match="num_heads"):
        infer_egc_config(EBMUNetModel(TINY_EGC, TINY_EGC_OPTIONS).state_dict(), {"num_heads": 3})


def test_egc_logits_and_energy_equal_the_reference_forward(tmp_path):
    net_path, state, vae_path, vae_state = save_egc(tmp_path)
    model = load_egc(IMAGES_16, net_path, vae=vae_path, model_config=TINY_FLAGS)
    assert not model.training and model.capabilities == {"logits", "energy", "sample"}
    x = images(2, size=16)
    z = 0.18215 * ref_encode_mean(vae_state, 2 * x - 1)
    null = state["label_emb.weight"][10].expand(2, 1, -1)
    out_map, _ = ref_unet(state, z, torch.zeros(2), heads=2, num_res_blocks=1, context=null)
    assert out_map.shape == (2, 10, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(x), ref_sattn_pool(out_map), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.energy(x), -out_map.logsumexp(1).sum((1, 2)), atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="sigma = 0"):
        model.energy(x, 0.1)
    with pytest.raises(Exception, match="denoise"):
        model.denoise(x, 0.1)


def test_egc_eps_is_the_gradient_of_the_energy_and_conditions_on_the_label(tmp_path):
    net_path, state, vae_path, _ = save_egc(tmp_path, seed=2)
    model = load_egc(IMAGES_16, net_path, vae=vae_path, model_config=TINY_FLAGS)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([10.0, 500.0]), torch.tensor([3, 7])
    eps = model.eps(z, t, y)
    # Finite differences of the reference energy with the label's embedding as context.
    context = state["label_emb.weight"][y][:, None, :]

    def energy(zz):
        out_map, _ = ref_unet(state, zz, t, heads=2, num_res_blocks=1, context=context)
        return -out_map.logsumexp(1).sum((1, 2))

    direction = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    h = 1e-3
    with torch.no_grad():
        numeric = (energy(z + h * direction) - energy(z - h * direction)) / (2 * h)
    torch.testing.assert_close((eps * direction).sum((1, 2, 3)), numeric, atol=2e-2, rtol=2e-2)
    assert not torch.allclose(model.eps(z, t, None), eps)  # the null label is another condition
    abar = model.schedule.alphas_cumprod[[10, 500]].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(model.score(z, t, y), -eps / (1 - abar).sqrt(), atol=1e-5, rtol=1e-5)


def test_egc_loads_latent_diffusion_autoencoder_checkpoints_and_samples(tmp_path):
    net_path, _, vae_path, vae_state = save_egc(tmp_path, ldm_ckpt=True)
    model = load_egc(IMAGES_16, net_path, vae=vae_path,
                      model_config={**TINY_FLAGS, "timestep_respacing": "ddim4", "lr": 1e-4, "use_ddim": True})
    assert model.sample_steps == 4 and model.ddim
    torch.testing.assert_close(model.autoencoder.quant_conv.weight, vae_state["quant_conv.weight"])
    samples = model.sample(2, y=torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 3, 16, 16) and float(samples.min()) >= 0 and float(samples.max()) <= 1
    again = model.sample(2, y=torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(samples, again)  # DDIM is deterministic given the starting noise
    unguided = load_egc(IMAGES_16, net_path, vae=vae_path, model_config={**TINY_FLAGS, "sample_steps": 4, "classifier_scale": 0})
    assert not torch.allclose(unguided.sample(2, y=torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0)), samples)



def test_a_lightning_style_latent_diffusion_checkpoint_as_vae(tmp_path, monkeypatch):
    """latent diffusion's `model.ckpt` is a PyTorch Lightning checkpoint. One holding tensors and containers only
    (state_dict, optimizer states, counters) loads as --vae; one whose `callbacks` are keyed by Lightning's
    classes (as Lightning 1.x writes them) is refused by the restricted unpickler in one line that names the class
    and the way out, never unpickled silently."""
    import types

    from robusteval.core.checkpoints import UnsafePickleError

    net_path, _, _, vae_state = save_egc(tmp_path)
    weights = {**vae_state, "loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.ones(2, 3, 4, 4)}
    lightning = {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.4.2", "state_dict": weights,
                 "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 1e-4}]}],
                 "lr_schedulers": []}
    plain = tmp_path / "plain-model.ckpt"
    torch.save(lightning, plain)
    model = load_egc(IMAGES_16, net_path, vae=plain, model_config=TINY_FLAGS)
    torch.testing.assert_close(model.autoencoder.quant_conv.weight, vae_state["quant_conv.weight"])

    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:  # what Lightning 1.x keys a checkpoint's callback states by
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    packages = ("pytorch_lightning", "pytorch_lightning.callbacks")
    with monkeypatch.context() as patched:  # Lightning importable only while the file is written
        for name in packages:
            patched.setitem(sys.modules, name, types.ModuleType(name))
        patched.setitem(sys.modules, module.__name__, module)
        full = tmp_path / "model.ckpt"
        torch.save({**lightning, "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}}}, full)
    assert "pytorch_lightning" not in sys.modules
    with pytest.raises(UnsafePickleError) as refused:
        load_egc(IMAGES_16, net_path, vae=full, model_config=TINY_FLAGS)
    message = str(refused.value)
    assert "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in message
    assert "--allow-unsafe-pickle" in message and "\n" not in message


def test_egc_refuses_mismatched_files_and_data(tmp_path):
    net_path, _, vae_path, _ = save_egc(tmp_path)
    with pytest.raises(CheckpointError, match="sides divisible by 4"):
        load_egc(DatasetInfo("odd", 10, (3, 18, 18), tuple("0123456789")), net_path, vae=vae_path, model_config=TINY_FLAGS)
    with pytest.raises(CheckpointError, match="classes"):
        load_egc(DatasetInfo("c100", 100, (3, 16, 16), tuple(map(str, range(100)))), net_path, vae=vae_path, model_config=TINY_FLAGS)
    other_vae = tmp_path / "vae3.pth"
    torch.save(AutoencoderKL(replace(TINY_VAE, z_channels=3, embed_dim=3)).state_dict(), other_vae)
    with pytest.raises(CheckpointError, match="3-channel latents"):
        load_egc(IMAGES_16, net_path, vae=other_vae, model_config=TINY_FLAGS)
    with pytest.raises(ValueError, match="unknown flags"):
        load_egc(IMAGES_16, net_path, vae=vae_path, model_config={"num_hedas": 2})
    with pytest.raises(CheckpointError, match="--vae"):
        load_egc(IMAGES_16, net_path)


# --- full-size EGC, counted from the official definitions ----------------------------------------

def official_transformer_count(channels: int, inner: int, context: int, depth: int) -> int:
    attn1 = 3 * inner * inner + inner * inner + inner
    attn2 = inner * inner + 2 * context * inner + inner * inner + inner
    ff = inner * 8 * inner + 8 * inner + 4 * inner * inner + inner
    return 2 * channels + channels * inner + inner + depth * (attn1 + attn2 + ff + 6 * inner) + inner * channels + channels


def official_ebm_unet_count(in_ch, mc, out_ch, nrb, mult, attn_ds, inner, context, depth, classes) -> int:
    emb = 4 * mc

    def res(ci, co):  # additive time conditioning (use_scale_shift_norm False)
        return 2 * ci + 9 * ci * co + co + emb * co + co + 2 * co + 9 * co * co + co + (0 if ci == co else ci * co + co)

    def attn(c):
        return official_transformer_count(c, inner, context, depth)

    total = mc * emb + emb + emb * emb + emb + 9 * in_ch * mc + mc
    ch, chans, ds = mc, [mc], 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            total += res(ch, m * mc) + (attn(m * mc) if ds in attn_ds else 0)
            ch = m * mc
            chans.append(ch)
        if level != len(mult) - 1:
            total += 9 * ch * ch + ch
            chans.append(ch)
            ds *= 2
    total += 2 * res(ch, ch) + attn(ch)
    for level, m in list(enumerate(mult))[::-1]:
        for i in range(nrb + 1):
            total += res(ch + chans.pop(), m * mc)
            ch = m * mc
            total += attn(ch) if ds in attn_ds else 0
            if level and i == nrb:
                total += 9 * ch * ch + ch
                ds //= 2
    return total + 2 * ch + 9 * mc * out_ch + out_ch + (classes + 1) * context


def official_kl_autoencoder_count(ch, ch_mult, nrb, z, embed) -> int:
    def res(ci, co):
        return 2 * ci + 9 * ci * co + co + 2 * co + 9 * co * co + co + (0 if ci == co else ci * co + co)

    def attn(c):
        return 2 * c + 4 * (c * c + c)

    def conv3(ci, co):
        return 9 * ci * co + co

    enc = conv3(3, ch)
    block_in = ch
    for i, m in enumerate(ch_mult):
        for _ in range(nrb):
            enc += res(block_in, ch * m)
            block_in = ch * m
        if i != len(ch_mult) - 1:
            enc += conv3(block_in, block_in)
    enc += 2 * res(block_in, block_in) + attn(block_in) + 2 * block_in + conv3(block_in, 2 * z)
    dec = conv3(z, block_in) + 2 * res(block_in, block_in) + attn(block_in)
    for i in reversed(range(len(ch_mult))):
        for _ in range(nrb + 1):
            dec += res(block_in, ch * ch_mult[i])
            block_in = ch * ch_mult[i]
        if i != 0:
            dec += conv3(block_in, block_in)
    dec += 2 * block_in + conv3(block_in, 3)
    return enc + dec + (2 * z * 2 * embed + 2 * embed) + (embed * z + z)


def test_egc_full_size_parameter_counts_match_the_official_definitions():
    # run_imagenet_egc_*.sh: --num_channels 384 --num_res_blocks 2 --channel_mult 1,2,4 --attention_resolutions 32,16,8
    # (image_size 32 → ds 1, 2, 4) --num_head_channels 64 (num_heads 4 by default) --in_channels 4 --context_dim 512
    # --transformer_depth 1 --use_scale_shift_norm False; out_channels = num_classes = 1000.
    config = UNetConfig(in_channels=4, model_channels=384, out_channels=1000, num_res_blocks=2, channel_mult=(1, 2, 4),
                        attention_ds=(1, 2, 4), num_heads=4, num_head_channels=64, use_scale_shift_norm=False)
    with torch.device("meta"):
        net = EBMUNetModel(config, EGCOptions())
        vae = AutoencoderKL(AutoencoderConfig())
        published = build_egc(DatasetInfo("imagenet", 1000, (3, 256, 256), tuple(map(str, range(1000)))))
    assert parameter_count(published) == parameter_count(net) + parameter_count(vae)
    assert published.latent_shape == (4, 32, 32)
    assert parameter_count(net) == official_ebm_unet_count(4, 384, 1000, 2, (1, 2, 4), (1, 2, 4), 256, 512, 1, 1000)
    # The KL-f8 autoencoder (ddconfig_f8 of EGC's extract_feat.py = latent diffusion's kl-f8; Stable Diffusion's VAE).
    assert parameter_count(vae) == official_kl_autoencoder_count(128, (1, 2, 4, 4), 2, 4, 4) == 83_653_863


# --- the engines run on the loaded models ------------------------------------------------------------

def test_jdm_attacks_through_its_denoiser_and_denoised_certification_finish(tmp_path):
    from robusteval.attacks.evaluate import evaluate_attack
    from robusteval.smoothing.engine import certify

    path, _ = save_jdm(tmp_path, ONE_LEVEL)
    model = load_jdm(SMALL, path)
    x = images(4, size=16)
    from robusteval.core.interface import trusted_inputs

    with torch.no_grad(), trusted_inputs():  # as the pipeline: the denoised image may leave [0, 1]
        y = model.logits(model.denoise(x, 0.25)).argmax(1)  # labels the deployed pipeline gets right
    attacked = evaluate_attack(model, (x, y), attack="pgd", eps=[2 / 255], steps=2, defense="denoise:0.25",
                               gradient="full", device="cpu", large_eps_check=False, masking_checks=False)
    assert attacked.n == 4 and attacked.clean_accuracy == 1.0 and not model.training
    assert 0.0 <= attacked.curve[0].robust_accuracy <= 1.0
    result = certify(model, (x, y), sigma=0.25, n0=4, n=16, mode="denoised", batch_size=16, compile=False)
    assert len(result.records) == 4


def test_egc_logits_attack_finishes(tmp_path):
    from robusteval.attacks.evaluate import evaluate_attack

    net_path, _, vae_path, _ = save_egc(tmp_path)
    model = load_egc(IMAGES_16, net_path, vae=vae_path, model_config=TINY_FLAGS)
    x = images(2, size=16)
    with torch.no_grad():
        y = model.logits(x).argmax(1)
    attacked = evaluate_attack(model, (x, y), attack="pgd", eps=[2 / 255], steps=2, device="cpu",
                               large_eps_check=False, masking_checks=False)
    assert attacked.n == 2 and attacked.clean_accuracy == 1.0
