"""The papers' own checkpoint files load as the official code writes them, and compute what it computes.

Every file here is synthetic: a small configuration of the official
architecture (WRN-10-2, ResNet-20, a two-block ViT), saved with the
official nesting and key names. The reference forwards are written out
functionally from the state dict and the documented preprocessing, without
robusteval's modules, so a wrong layer order, activation, normalisation or
key mapping changes the numbers. Full-size configurations are built on the
meta device (no memory, no download) and their parameter counts checked
against closed forms of the official definitions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import sys
import types
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import Tensor

import robusteval
from robusteval.cli import main
from robusteval.core.checkpoints import CheckpointError, UnsafePickleError
from robusteval.data import dataset_info
from robusteval.model_zoo.official.cifar_resnet import CifarResNet
from robusteval.model_zoo.official.cohen import build_cohen
from robusteval.model_zoo.official.gmmc import OfficialGMMC, build_gmmc, mmc_centers
from robusteval.model_zoo.official.jem import OfficialJEM, build_jem

CIFAR10 = dataset_info("cifar10")
# locuslab/smoothing datasets.py
COHEN_CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
COHEN_CIFAR_STD = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)


def seeded_state(module: torch.nn.Module, seed: int) -> dict[str, Tensor]:
    """The module's state dict with every float entry redrawn (BN statistics included), so nothing is trivial."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in module.state_dict().items():
        if not value.is_floating_point():
            state[key] = value.clone()
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(value.shape, generator=generator)
        else:
            state[key] = 0.2 * torch.randn(value.shape, generator=generator)
    return state


def images(n: int = 3, size: int = 32, seed: int = 0) -> Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- synthetic official files ----------------------------------------------------------------------
def jem_file(path: Path, num_classes: int = 10, depth: int = 10, width: int = 2) -> dict[str, Tensor]:
    """What JEM's train_wrn_ebm.py `checkpoint()` writes, for a WRN-depth-width CCF."""
    info = dataset_info("cifar10" if num_classes == 10 else "cifar100")
    state = seeded_state(OfficialJEM(info, depth, width), seed=1)
    buffer = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    torch.save({"model_state_dict": state, "replay_buffer": buffer}, path)
    return state


def cohen_cifar_file(path: Path, depth: int = 20) -> dict[str, Tensor]:
    """What locuslab/smoothing's train.py writes for cifar_resnet20 (Sequential(NormalizeLayer, net))."""
    net = torch.nn.Sequential(torch.nn.Identity(), CifarResNet(depth, 10))
    state = seeded_state(net, seed=3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9).state_dict()
    torch.save({"epoch": 90, "arch": f"cifar_resnet{depth}", "state_dict": state, "optimizer": optimizer}, path)
    return state


# --- reference forwards, written from the official code ---------------------------------------------
def reference_jem_logits(state: dict[str, Tensor], x: Tensor) -> Tensor:
    """CCF.classify of wgrathwohl/JEM on JEM's normalisation, from the raw state dict."""
    return reference_wrn_features(state, x) @ state["class_output.weight"].T + state["class_output.bias"]


def reference_wrn_features(state: dict[str, Tensor], x: Tensor) -> Tensor:
    """Wide_ResNet(norm=None).forward on (x - 0.5)/0.5 (JEM's and GMMC's data pipeline), from the raw state dict."""
    h = F.conv2d((x - 0.5) / 0.5, state["f.conv1.weight"], state["f.conv1.bias"], padding=1)
    for stage in (1, 2, 3):
        index = 0
        while f"f.layer{stage}.{index}.conv1.weight" in state:
            p = f"f.layer{stage}.{index}."
            stride = 2 if stage > 1 and index == 0 else 1
            out = F.conv2d(F.leaky_relu(h, 0.2), state[p + "conv1.weight"], state[p + "conv1.bias"], padding=1)
            out = F.conv2d(F.leaky_relu(out, 0.2), state[p + "conv2.weight"], state[p + "conv2.bias"],
                           stride=stride, padding=1)
            if p + "shortcut.0.weight" in state:
                h = F.conv2d(h, state[p + "shortcut.0.weight"], state[p + "shortcut.0.bias"], stride=stride)
            h = out + h
            index += 1
    return F.leaky_relu(h, 0.2).mean(dim=(2, 3))  # avg_pool2d(·, 8) of an 8×8 map


def _bn(h: Tensor, state: dict[str, Tensor], prefix: str) -> Tensor:
    return F.batch_norm(h, state[prefix + "running_mean"], state[prefix + "running_var"], state[prefix + "weight"],
                        state[prefix + "bias"], training=False, eps=1e-5)


def reference_cohen_cifar_logits(state: dict[str, Tensor], x: Tensor) -> Tensor:
    """Sequential(NormalizeLayer, cifar_resnet) of locuslab/smoothing, from the raw state dict."""
    h = (x - COHEN_CIFAR_MEAN) / COHEN_CIFAR_STD
    h = F.relu(_bn(F.conv2d(h, state["1.conv1.weight"], padding=1), state, "1.bn1."))
    for stage in (1, 2, 3):
        index = 0
        while f"1.layer{stage}.{index}.conv1.weight" in state:
            p = f"1.layer{stage}.{index}."
            stride = 2 if stage > 1 and index == 0 else 1
            out = F.relu(_bn(F.conv2d(h, state[p + "conv1.weight"], stride=stride, padding=1), state, p + "bn1."))
            out = _bn(F.conv2d(out, state[p + "conv2.weight"], padding=1), state, p + "bn2.")
            if p + "downsample.0.weight" in state:
                h = _bn(F.conv2d(h, state[p + "downsample.0.weight"], stride=stride), state, p + "downsample.1.")
            h = F.relu(out + h)
            index += 1
    return F.avg_pool2d(h, 8).flatten(1) @ state["1.fc.weight"].T + state["1.fc.bias"]


# --- closed-form parameter counts of the official definitions ---------------------------------------
def wrn_parameters(depth: int, k: int, classes: int, jem_linear: bool = True) -> int:
    """Wide_ResNet(depth, k, norm=None) + CCF heads: convs with bias, 1×1 shortcuts where the shape changes."""
    n = (depth - 4) // 6
    total = 3 * 16 * 9 + 16
    c_in = 16
    for c in (16 * k, 32 * k, 64 * k):
        total += (9 * c_in * c + c) + (9 * c * c + c) + (c_in * c + c if c_in != c else 0)
        total += (n - 1) * 2 * (9 * c * c + c)
        c_in = c
    d = 64 * k
    heads = (d + 1) + (d * classes + classes)  # energy_output, class_output
    return total + (d * 10 + 10 if jem_linear else 0) + heads


def cifar_resnet_parameters(depth: int, classes: int = 10) -> int:
    """He et al.'s CIFAR ResNet with BasicBlocks: bias-free convs, BN weight+bias, 1×1 conv+BN downsample."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16
    c_in = 16
    for c in (16, 32, 64):
        total += 9 * c_in * c + 9 * c * c + 4 * c + (c_in * c + 2 * c if c_in != c else 0)
        total += (n - 1) * (18 * c * c + 4 * c)
        c_in = c
    return total + 64 * classes + classes


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# === JEM ============================================================================================
def test_jem_file_loads_with_official_keys_and_computes_the_official_logits(tmp_path: Path) -> None:
    path = tmp_path / "jem.pt"
    state = jem_file(path)
    for key in ("f.conv1.weight", "f.layer1.0.conv1.bias", "f.layer1.0.shortcut.0.weight", "f.layer3.0.conv2.weight",
                "f.linear.weight", "energy_output.weight", "class_output.weight"):
        assert key in state
    model = robusteval.create_model("jem", dataset="cifar10", checkpoint=path)
    assert (model.name, model.num_classes, model.input_shape) == ("jem", 10, (3, 32, 32))
    assert (model.f.depth, model.f.widen_factor) == (10, 2)  # read from the shapes
    x = images()
    with torch.no_grad():
        expected = reference_jem_logits(state, x)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.energy(x), -torch.logsumexp(expected, 1), atol=1e-5, rtol=1e-5)
    assert not model.training


def test_jem_reads_the_bare_state_dict_and_cifar100_and_other_sizes(tmp_path: Path) -> None:
    state = jem_file(tmp_path / "jem100.pt", num_classes=100, depth=16, width=1)
    bare = tmp_path / "bare.pt"
    torch.save(state, bare)
    model = robusteval.create_model("jem", dataset="cifar100", checkpoint=bare)
    assert model.num_classes == 100 and (model.f.depth, model.f.widen_factor) == (16, 1)
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_jem_logits(state, x), atol=1e-5, rtol=1e-5)
    with pytest.raises(CheckpointError, match="class_output has 100 classes but data set cifar10 has 10"):
        robusteval.create_model("jem", dataset="cifar10", checkpoint=bare)


def test_jem_samples_start_from_the_files_replay_buffer(tmp_path: Path) -> None:
    path = tmp_path / "jem.pt"
    jem_file(path)
    model = robusteval.create_model("jem", dataset="cifar10", checkpoint=path)
    buffer = torch.load(path, weights_only=True)["replay_buffer"]
    torch.testing.assert_close(model.replay_buffer, (buffer * 0.5 + 0.5).clamp(0, 1))
    model.sample_config = type(model.sample_config)(steps=0, step_size=0.25, noise=0.005)
    starts = model.sample(4, generator=torch.Generator().manual_seed(0))
    # With zero SGLD steps every sample is one of the buffer's images.
    distances = (starts.flatten(1)[:, None] - model.replay_buffer.flatten(1)[None]).abs().amax(2)
    assert float(distances.min(1).values.max()) == 0.0
    # Class-conditional chains start from buffer images the model classifies as the class (cond_samples).
    with torch.no_grad():
        classes = model(model.replay_buffer).argmax(1)
    label = int(classes[0])
    starts = model.sample(3, torch.full((3,), label), generator=torch.Generator().manual_seed(1))
    for start in starts:
        matches = [i for i in range(len(classes)) if torch.equal(model.replay_buffer[i], start)]
        assert matches and all(int(classes[i]) == label for i in matches)
    model.sample_config = type(model.sample_config)(steps=3, step_size=0.25, noise=0.005)
    y = torch.tensor([0, 3])
    samples = model.sample(2, y, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 3, 32, 32) and 0 <= float(samples.min()) and float(samples.max()) <= 1


def test_jem_full_size_is_wrn_28_10_with_the_official_parameter_count() -> None:
    with torch.device("meta"):
        model = build_jem(CIFAR10)
        model100 = build_jem(dataset_info("cifar100"))
    assert (model.f.depth, model.f.widen_factor) == (28, 10)
    assert count(model) == wrn_parameters(28, 10, 10)
    assert count(model100) == wrn_parameters(28, 10, 100)
    meta = robusteval.create_model("jem", dataset="cifar10", pretrained=False, device=torch.device("meta"))
    assert count(meta) == wrn_parameters(28, 10, 10)


def test_jem_without_a_file_explains_that_nothing_is_shipped() -> None:
    with pytest.raises(CheckpointError, match="ships no weights.*checkpoint=<file>"):
        robusteval.create_model("jem", dataset="cifar10")


# === GMMC ===========================================================================================
def gmmc_file(path: Path, num_classes: int = 10, depth: int = 10, width: int = 2, centers: Tensor | None = None,
              margin: bool = True) -> tuple[dict[str, Tensor], Tensor]:
    """What GMMC's utils.checkpoint writes: F's state dict, the replay buffer [x, y] and the pickled LDALayer."""
    info = dataset_info("cifar10" if num_classes == 10 else "cifar100")
    state = seeded_state(OfficialGMMC(info, depth, width), seed=5)
    if centers is None:
        centers = mmc_centers(num_classes, 64 * width)
    generator = torch.Generator().manual_seed(6)
    buffer = [torch.rand(4 * num_classes, 3, 32, 32, generator=generator) * 2 - 1,
              torch.arange(num_classes).repeat_interleave(4)]
    contents = {"model_state_dict": state, "replay_buffer": buffer}
    if margin:
        contents["margin"] = official_lda_layer(num_classes, 64 * width, centers)
    with lda_module_importable():
        torch.save(contents, path)
    return state, centers


@contextlib.contextmanager
def lda_module_importable():
    """GMMC's LDALayer lives in its repository's top-level module `LDALayer`; pickling needs it importable."""
    sys.modules["LDALayer"] = _LDA_MODULE
    try:
        yield
    finally:
        del sys.modules["LDALayer"]


def _make_lda_module() -> types.ModuleType:
    module = types.ModuleType("LDALayer")

    class LDALayer(torch.nn.Module):  # the official layer's state: a fixed, non-trainable `centers` parameter
        def __init__(self, num_classes: int, feat_dim: int, alpha: float, args=None):
            super().__init__()
            self.feat_dim, self.num_classes = feat_dim, num_classes
            self.centers = torch.nn.Parameter(torch.randn(num_classes, feat_dim), requires_grad=False)

    LDALayer.__module__ = "LDALayer"
    LDALayer.__qualname__ = "LDALayer"
    module.LDALayer = LDALayer
    return module


_LDA_MODULE = _make_lda_module()


def official_lda_layer(num_classes: int, dim: int, centers: Tensor) -> torch.nn.Module:
    layer = _LDA_MODULE.LDALayer(num_classes, dim, 1.0)
    layer.centers.data = centers.clone()
    return layer


def reference_gmmc_logits(state: dict[str, Tensor], centers: Tensor, x: Tensor) -> Tensor:
    """LDALayer.forward(F.feature(x)): −½ Σ (φ − μ_c)², from the raw state dict."""
    features = reference_wrn_features(state, x)
    return -0.5 * ((features[:, None, :] - centers[None]) ** 2).sum(-1)


def test_max_mahalanobis_centres_are_equiangular_with_norm_c() -> None:
    for classes, dim in ((10, 640), (100, 640), (3, 5)):
        centers = mmc_centers(classes, dim).double()
        gram = centers @ centers.T
        expected = torch.full((classes, classes), -100.0 / (classes - 1), dtype=torch.float64)
        expected.fill_diagonal_(100.0)
        torch.testing.assert_close(gram, expected, atol=1e-3, rtol=1e-4)
        assert torch.count_nonzero(centers[:, classes:]) == 0  # row k lives on the first k + 1 axes


def test_gmmc_file_with_its_pickled_ldalayer_loads_and_computes_the_official_logits(tmp_path: Path) -> None:
    path = tmp_path / "gmmc.pt"
    centers = mmc_centers(10, 128) * torch.linspace(0.9, 1.1, 10).view(-1, 1)  # the file's, not recomputed ones
    state, centers = gmmc_file(path, centers=centers)
    assert "f.layer1.0.shortcut.0.weight" in state and not any(k.startswith("f.linear") for k in state)
    with pytest.raises(ModuleNotFoundError):
        __import__("LDALayer")  # GMMC's code is not importable here: the stand-in must do
    model = robusteval.create_model("gmmc", dataset="cifar10", checkpoint=path)
    torch.testing.assert_close(model.centers, centers)
    x = images()
    with torch.no_grad():
        expected = reference_gmmc_logits(state, centers, x)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.energy(x), -torch.logsumexp(expected, 1), atol=1e-5, rtol=1e-5)
    assert model.replay_buffer is not None and model.replay_buffer[0].shape == (40, 3, 32, 32)
    model.sample_config = type(model.sample_config)(steps=0, step_size=0.25, noise=0.0)
    y = torch.tensor([2, 7])
    starts = model.sample(2, y, generator=torch.Generator().manual_seed(0))
    # Class-y chains start in the buffer's class-y block (slots 4y .. 4y + 3), as sample_p_0 indexes it.
    for row, label in enumerate(y.tolist()):
        block = model.replay_buffer[0][4 * label: 4 * label + 4]
        assert any(torch.equal(starts[row], image) for image in block)
    model.sample_config = type(model.sample_config)(steps=2, step_size=0.25, noise=0.0)
    assert model.sample(2, y, generator=torch.Generator().manual_seed(0)).shape == (2, 3, 32, 32)


def float32_cal_center(n_classes: int, dim: int, c: float = 10.0) -> Tensor:
    """GMMC's Utils/mmc_utils.py `cal_center` as the official code computes it: float32 tensors throughout."""
    mean_logits = torch.zeros(n_classes, dim)
    mean_logits[0, 0] = 1
    for k in range(1, n_classes):
        for j in range(k):
            dot = torch.dot(mean_logits[k, :], mean_logits[j, :])
            mean_logits[k, j] = -(1 / (n_classes - 1) + dot) / mean_logits[j, j]
        mean_logits[k, k] = torch.sqrt(torch.abs(1 - torch.norm(mean_logits[k, :]).pow(2)))
    return mean_logits * c


@pytest.mark.parametrize(("classes", "dim"), [(10, 128), (10, 640), (100, 640)])
def test_max_mahalanobis_centres_are_the_official_float32_ones(classes: int, dim: int) -> None:
    official = float32_cal_center(classes, dim)
    assert mmc_centers(classes, dim).dtype == torch.float32
    assert torch.equal(mmc_centers(classes, dim), official)
    # A float64 solve is not what the files hold: it differs by several 1e-3 on the last centres.
    rows = torch.zeros(classes, dim, dtype=torch.float64)
    rows[0, 0] = 1.0
    for k in range(1, classes):
        for j in range(k):
            rows[k, j] = -(1.0 / (classes - 1) + rows[k] @ rows[j]) / rows[j, j]
        rows[k, k] = (1.0 - rows[k].pow(2).sum()).abs().sqrt()
    assert float((rows * 10 - official.double()).abs().max()) > 1e-3


def test_a_genuine_gmmc_file_s_centres_are_recognised_as_max_mahalanobis(tmp_path: Path, caplog) -> None:
    path = tmp_path / "gmmc.pt"
    gmmc_file(path, centers=float32_cal_center(10, 128))
    with caplog.at_level("INFO", logger="robusteval.model_zoo.official.gmmc"):
        model = robusteval.create_model("gmmc", dataset="cifar10", checkpoint=path)
    assert "are not the Max-Mahalanobis centres" not in caplog.text
    assert torch.equal(model.centers, float32_cal_center(10, 128))
    # Other centres (another --mu_c) are still named as such.
    gmmc_file(path, centers=float32_cal_center(10, 128, c=5.0))
    with caplog.at_level("INFO", logger="robusteval.model_zoo.official.gmmc"):
        robusteval.create_model("gmmc", dataset="cifar10", checkpoint=path)
    assert "are not the Max-Mahalanobis centres" in caplog.text


def test_gmmc_samples_with_the_published_gamma(tmp_path: Path) -> None:
    """Staged sampling's target is u_y + γ·z with the published --gamma 0.001 (scripts/cifar10_gen.sh), z drawn
    once per chain after its start."""
    from robusteval.training.sgld import sgld

    path = tmp_path / "gmmc.pt"
    gmmc_file(path)
    model = robusteval.create_model("gmmc", dataset="cifar10", checkpoint=path)
    assert model.sample_gamma == 0.001
    model.sample_config = type(model.sample_config)(steps=2, step_size=0.25, noise=0.0)
    y = torch.tensor([2, 7])
    samples = model.sample(2, y, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    start, labels = model._chain_starts(2, y, generator)
    target = model.centers[labels] + 0.001 * torch.randn(2, model.centers.shape[1], generator=generator)

    def energy(v):
        return 0.5 * (model.features(v) - target).pow(2).sum(1) / 64

    torch.testing.assert_close(samples, sgld(energy, start, model.sample_config, generator))
    model.sample_gamma = 0.0
    assert not torch.equal(model.sample(2, y, generator=torch.Generator().manual_seed(0)), samples)

def test_every_official_loader_returns_an_eval_mode_model(tmp_path: Path) -> None:
    from robusteval.model_zoo.official.cohen import load_cohen
    from robusteval.model_zoo.official.dmae_vit import load_dmae
    from robusteval.model_zoo.official.gmmc import load_gmmc
    from robusteval.model_zoo.official.jem import load_jem

    cifar = dataset_info("cifar10")
    jem_file(tmp_path / "jem.pt")
    gmmc_file(tmp_path / "gmmc.pt")
    cohen_cifar_file(tmp_path / "cohen.pt")
    dmae_file(tmp_path / "dmae.pt")
    with lda_module_importable():
        loaded = [load_jem(cifar, tmp_path / "jem.pt"), load_gmmc(cifar, tmp_path / "gmmc.pt"),
                  load_cohen(cifar, tmp_path / "cohen.pt"), load_dmae(cifar, tmp_path / "dmae.pt")]
    for model in loaded:
        assert not any(module.training for module in model.modules()), type(model).__name__


def test_gmmc_with_allow_unsafe_pickle_still_reads_the_ldalayer_without_gmmcs_code(tmp_path: Path) -> None:
    path = tmp_path / "gmmc.pt"
    state, centers = gmmc_file(path)
    model = robusteval.create_model("gmmc", dataset="cifar10", checkpoint=path, allow_unsafe_pickle=True)
    torch.testing.assert_close(model.centers, centers)
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_gmmc_logits(state, centers, x), atol=1e-5, rtol=1e-5)


def test_gmmc_without_margin_uses_the_recomputed_centres_and_cifar100_sizes(tmp_path: Path) -> None:
    path = tmp_path / "gmmc100.pt"
    state, _ = gmmc_file(path, num_classes=100, depth=16, width=2, margin=False)
    model = robusteval.create_model("gmmc", dataset="cifar100", checkpoint=path)
    assert (model.f.depth, model.f.widen_factor, model.num_classes) == (16, 2, 100)
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_gmmc_logits(state, mmc_centers(100, 128), x), atol=1e-5,
                                   rtol=1e-5)


def test_gmmc_full_size_has_the_official_parameter_count() -> None:
    with torch.device("meta"):
        model = build_gmmc(CIFAR10)
    assert count(model) == wrn_parameters(28, 10, 10, jem_linear=False) - (641 + 6410)  # no linear, no CCF heads
    assert model.centers.shape == (10, 640)


# === DMAE ============================================================================================
def dmae_file(path: Path, num_classes: int = 10, extra: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """What MAE's misc.save_model writes after DMAE's fine-tuning, for a two-block, 128-wide ViT/16."""
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=128, depth=2, num_heads=2, mlp_ratio=4,
                            qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                            num_classes=num_classes, global_pool="avg")
    state = seeded_state(vit, seed=7)
    optimizer = torch.optim.AdamW(vit.parameters(), lr=1e-3).state_dict()
    args = argparse.Namespace(model="vit_tiny_test", global_pool=True, nb_classes=num_classes, input_size=224,
                              sigma=0.25, output_dir="./out", device="cuda")
    torch.save({"model": {**state, **(extra or {})}, "optimizer": optimizer, "epoch": 99,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0}, "args": args}, path)
    return state


def reference_vit_logits(state: dict[str, Tensor], x: Tensor, mean: Tensor, std: Tensor, heads: int = 2) -> Tensor:
    """models_vit.VisionTransformer.forward (global_pool) written out, on the documented preprocessing."""
    from torchvision.transforms import InterpolationMode, Resize

    if x.shape[-1] != 224:  # engine_finetune.py / util/smooth.py: Resize((224, 224), BICUBIC) on the noisy tensor
        x = Resize((224, 224), interpolation=InterpolationMode.BICUBIC, antialias=False)(x)
    x = (x - mean) / std
    h = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=16).flatten(2)
    h = torch.cat([state["cls_token"].expand(len(x), -1, -1), h.transpose(1, 2)], 1) + state["pos_embed"]
    width = h.shape[-1]
    for block in range(2):
        p = f"blocks.{block}."
        y = F.layer_norm(h, (width,), state[p + "norm1.weight"], state[p + "norm1.bias"], eps=1e-6)
        q, k, v = (y @ state[p + "attn.qkv.weight"].T + state[p + "attn.qkv.bias"]).chunk(3, dim=-1)
        split = lambda t: t.reshape(len(x), -1, heads, width // heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), dim=-1)
        y = (attention @ v).transpose(1, 2).reshape(len(x), -1, width)
        h = h + y @ state[p + "attn.proj.weight"].T + state[p + "attn.proj.bias"]
        y = F.layer_norm(h, (width,), state[p + "norm2.weight"], state[p + "norm2.bias"], eps=1e-6)
        y = F.gelu(y @ state[p + "mlp.fc1.weight"].T + state[p + "mlp.fc1.bias"])
        h = h + y @ state[p + "mlp.fc2.weight"].T + state[p + "mlp.fc2.bias"]
    pooled = F.layer_norm(h[:, 1:].mean(1), (width,), state["fc_norm.weight"], state["fc_norm.bias"], eps=1e-6)
    return pooled @ state["head.weight"].T + state["head.bias"]


def vit_parameters(width: int, depth: int, patch: int, classes: int, image: int = 224) -> int:
    tokens = (image // patch) ** 2 + 1
    return (3 * patch * patch * width + width) + width + tokens * width + depth * (12 * width**2 + 13 * width) \
        + 2 * width + width * classes + classes


DMAE_CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
DMAE_CIFAR_STD = torch.tensor([0.2471, 0.2435, 0.2616]).view(1, 3, 1, 1)


def test_dmae_cifar10_file_loads_and_resizes_the_noisy_32px_image_as_the_official_code(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint-99.pth"
    state = dmae_file(path)
    assert {"fc_norm.weight", "blocks.1.attn.qkv.weight", "head.weight", "pos_embed"} <= set(state)
    assert "norm.weight" not in state
    model = robusteval.create_model("dmae", dataset="cifar10", checkpoint=path)
    assert (model.num_classes, model.input_shape, len(model.vit.blocks)) == (10, (3, 32, 32), 2)
    x = images(2)
    noisy = x + 0.25 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_vit_logits(state, x, DMAE_CIFAR_MEAN, DMAE_CIFAR_STD),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.logits(noisy, 0.25),
                                   reference_vit_logits(state, noisy, DMAE_CIFAR_MEAN, DMAE_CIFAR_STD),
                                   atol=1e-5, rtol=1e-5)


def test_dmae_imagenet_file_and_pretraining_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "imagenet.pth"
    extra = {"mask_token": torch.zeros(1, 1, 128), "decoder_embed.weight": torch.zeros(64, 128)}
    state = dmae_file(path, num_classes=1000, extra=extra)
    with caplog.at_level("WARNING"):
        model = robusteval.create_model("dmae", dataset="imagenet", checkpoint=path)
    assert "ignoring 2 pre-training-only entries" in caplog.text
    x = images(1, size=224)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_vit_logits(state, x, mean, std), atol=1e-5, rtol=1e-5)
    # A pre-training file has a decoder but no classifier: the error names what is missing.
    pretrain = {k: v for k, v in state.items() if not k.startswith(("fc_norm", "head"))}
    torch.save({"model": {**pretrain, **extra, "norm.weight": torch.ones(128), "norm.bias": torch.zeros(128)},
                "args": argparse.Namespace(model="mae_vit_base_patch16")}, tmp_path / "pretrain.pth")
    with pytest.raises(CheckpointError, match=r"is not a DMAE fine-tuning checkpoint .*missing keys \['fc_norm.bias', "
                                              r"'fc_norm.weight', 'head.bias', 'head.weight'\].*unexpected keys "
                                              r"\['norm.bias', 'norm.weight'\]"):
        robusteval.create_model("dmae", dataset="imagenet", checkpoint=tmp_path / "pretrain.pth")


def test_dmae_full_size_vits_have_the_official_parameter_counts() -> None:
    from robusteval.model_zoo.official.dmae_vit import build_dmae

    assert vit_parameters(768, 12, 16, 1000) == 86_567_656  # timm's vit_base_patch16_224
    assert vit_parameters(1024, 24, 16, 1000) == 304_326_632  # timm's vit_large_patch16_224
    with torch.device("meta"):
        base_cifar = build_dmae(CIFAR10)
        base = build_dmae(dataset_info("imagenet"))
        large = build_dmae(dataset_info("imagenet"), "vit_large_patch16")
    assert count(base_cifar) == vit_parameters(768, 12, 16, 10)
    assert count(base) == vit_parameters(768, 12, 16, 1000)
    assert count(large) == vit_parameters(1024, 24, 16, 1000)
    assert base.vit.blocks[0].attn.num_heads == 12 and large.vit.blocks[0].attn.num_heads == 16


# === Cohen et al. ====================================================================================
def test_cohen_cifar_file_loads_with_official_keys_and_computes_the_official_logits(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pth.tar"
    state = cohen_cifar_file(path)
    for key in ("1.conv1.weight", "1.bn1.running_var", "1.layer1.0.conv1.weight", "1.layer2.0.downsample.0.weight",
                "1.layer3.2.bn2.bias", "1.fc.weight"):
        assert key in state
    model = robusteval.create_model("cohen", dataset="cifar10", checkpoint=path)
    assert (model.name, model.num_classes, model.input_shape) == ("cohen", 10, (3, 32, 32))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_cohen_cifar_logits(state, x), atol=1e-5, rtol=1e-5)


def test_cohen_files_without_num_batches_tracked_load(tmp_path: Path) -> None:
    state = cohen_cifar_file(tmp_path / "new.pt")
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save({"epoch": 1, "arch": "cifar_resnet20", "state_dict": old, "optimizer": {}}, tmp_path / "old.pt")
    model = robusteval.create_model("cohen", dataset="cifar10", checkpoint=tmp_path / "old.pt")
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_cohen_cifar_logits(state, x), atol=1e-5, rtol=1e-5)


def test_cohen_full_size_configurations_have_the_official_parameter_counts() -> None:
    assert cifar_resnet_parameters(20) == 272_474  # the figures of He et al.'s CIFAR ResNets
    assert cifar_resnet_parameters(110) == 1_730_714
    with torch.device("meta"):
        cifar = build_cohen(CIFAR10)
        imagenet = build_cohen(dataset_info("imagenet"))
    assert count(cifar) == cifar_resnet_parameters(110)
    assert count(imagenet) == 25_557_032  # torchvision's resnet50
    assert "1.module.layer1.0.conv3.weight" in imagenet.net.state_dict()
    assert count(CifarResNet(20, 10)) == cifar_resnet_parameters(20)


def cohen_imagenet_file(path: Path) -> dict[str, Tensor]:
    """train.py's file for ImageNet: Sequential(NormalizeLayer, DataParallel(resnet)), here a one-block-per-stage
    bottleneck ResNet of resnet50's design, so keys are '1.module.*'."""
    from torchvision.models.resnet import Bottleneck, ResNet

    net = torch.nn.Sequential(torch.nn.Identity(), torch.nn.DataParallel(ResNet(Bottleneck, [1, 1, 1, 1])))
    state = seeded_state(net, seed=4)
    torch.save({"epoch": 90, "arch": "resnet50", "state_dict": state, "optimizer": {}}, path)
    return state


def reference_cohen_imagenet_logits(state: dict[str, Tensor], x: Tensor) -> Tensor:
    """torchvision's ResNet (what the official code builds) on datasets.py's ImageNet normalisation."""
    from torchvision.models.resnet import Bottleneck, ResNet

    net = ResNet(Bottleneck, [1, 1, 1, 1]).eval()
    net.load_state_dict({k.removeprefix("1.module."): v for k, v in state.items()})
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return net((x - mean) / std)


def test_cohen_imagenet_file_loads_under_1_module(tmp_path: Path) -> None:
    path = tmp_path / "imagenet.pth.tar"
    state = cohen_imagenet_file(path)
    assert "1.module.layer1.0.conv1.weight" in state and "1.module.layer4.0.conv3.weight" in state
    model = robusteval.create_model("cohen", dataset="imagenet", checkpoint=path)
    assert (model.num_classes, model.input_shape) == (1000, (3, 224, 224))
    x = images(2, size=224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_cohen_imagenet_logits(state, x), atol=1e-5, rtol=1e-5)
    with pytest.raises(CheckpointError, match=r"ImageNet ResNet .* data set cifar10 has images of shape "
                                              r"\(3, 32, 32\)"):
        robusteval.create_model("cohen", dataset="cifar10", checkpoint=path)


def test_cli_certify_reads_an_imagenet_folder(tmp_path: Path) -> None:
    from test_data_cifar100_imagenet import make_imagenet

    make_imagenet(tmp_path / "imagenet")
    cohen_imagenet_file(tmp_path / "imagenet.pt")
    result = CliRunner().invoke(main, ["certify", "--model", "cohen", "--dataset", "imagenet", "--data-dir",
                                       str(tmp_path / "imagenet"), "--checkpoint", str(tmp_path / "imagenet.pt"),
                                       "--sigma", "0.5", "--n-images", "2", "--n0", "4", "--n", "8", "--batch-size",
                                       "8", "--device", "cpu", "--no-compile", "--quiet", "--json", "--out",
                                       str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["dataset"], summary["n_images"]) == ("imagenet", 2)
    records = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [r["label"] for r in records] == [0, 0]  # the first two images in the documented order: class n01440764


# === safety and errors ===============================================================================
class _RunsAShellCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_call_os_system_is_refused_with_the_class_named(tmp_path: Path) -> None:
    path = tmp_path / "malicious.pt"
    state = cohen_cifar_file(tmp_path / "ok.pt")
    marker = tmp_path / "the-payload-ran"
    payload = _RunsAShellCommand(marker)
    torch.save({"epoch": 1, "arch": "cifar_resnet20", "state_dict": state, "payload": payload}, path)
    for name in ("cohen", "jem"):
        with pytest.raises(UnsafePickleError, match=r"'posix\.system'.*--allow-unsafe-pickle"):
            robusteval.create_model(name, dataset="cifar10", checkpoint=path)
    result = CliRunner().invoke(main, ["sample", "--model", "jem", "--dataset", "cifar10", "--checkpoint",
                                       str(path), "--device", "cpu", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert "posix.system" in result.output and "--allow-unsafe-pickle" in result.output
    assert not marker.exists()


def test_a_file_of_another_architecture_lists_missing_and_unexpected_keys(tmp_path: Path) -> None:
    cohen_path = tmp_path / "cohen.pt"
    cohen_cifar_file(cohen_path)
    with pytest.raises(CheckpointError, match=r"is not JEM's CCF checkpoint .*missing keys \['class_output.bias', "
                                              r".*unexpected keys \['1.bn1.bias'"):
        robusteval.create_model("jem", dataset="cifar10", checkpoint=cohen_path)
    jem_path = tmp_path / "jem.pt"
    jem_file(jem_path)
    with pytest.raises(CheckpointError, match=r"is not a checkpoint of Cohen et al.'s train.py .*missing keys "
                                              r"\['1.bn1.bias'.*unexpected keys \['class_output.bias'"):
        robusteval.create_model("cohen", dataset="cifar10", checkpoint=jem_path)
    # A renamed key inside an otherwise sizable file: both lists name it.
    state = torch.load(jem_path, weights_only=True)["model_state_dict"]
    state["f.layer1.0.conv1.kernel"] = state.pop("f.layer1.0.conv1.bias")
    torch.save({"model_state_dict": state}, tmp_path / "renamed.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \['f.layer1.0.conv1.bias'\].*unexpected keys "
                                              r"\['f.layer1.0.conv1.kernel'\]"):
        robusteval.create_model("jem", dataset="cifar10", checkpoint=tmp_path / "renamed.pt")


def test_a_data_set_the_file_does_not_fit_is_an_error_before_any_work(tmp_path: Path) -> None:
    path = tmp_path / "cohen.pt"
    cohen_cifar_file(path)
    with pytest.raises(CheckpointError, match=r"CIFAR ResNet .*32×32.* data set imagenet has images of shape "
                                              r"\(3, 224, 224\)"):
        robusteval.create_model("cohen", dataset="imagenet", checkpoint=path)
    with pytest.raises(ValueError, match="official architecture of 'jem' .* is defined for the data sets cifar10, "
                                         "cifar100, not imagenet"):
        robusteval.create_model("jem", dataset="imagenet", checkpoint=path)


# === the command line ================================================================================
def make_cifar10(directory: Path, n: int = 4) -> Path:
    """A miniature cifar-10-batches-py folder (python pickles, as the official archive)."""
    folder = directory / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}, protocol=2))
    return directory


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("official")
    jem_file(root / "jem.pt")
    cohen_cifar_file(root / "cohen.pt")
    gmmc_file(root / "gmmc.pt")
    dmae_file(root / "dmae.pth")
    return {"jem": root / "jem.pt", "cohen": root / "cohen.pt", "gmmc": root / "gmmc.pt", "dmae": root / "dmae.pth",
            "data": make_cifar10(root / "data")}


def reference_logits(name: str, path: Path, x: Tensor) -> Tensor:
    """The row's reference forward on the file's weights (GMMC's centres are those its LDALayer was given)."""
    if name == "dmae":
        return reference_vit_logits(torch.load(path, weights_only=False)["model"], x, DMAE_CIFAR_MEAN,
                                    DMAE_CIFAR_STD)
    with lda_module_importable():
        loaded = torch.load(path, weights_only=False)
    if name == "gmmc":
        return reference_gmmc_logits(loaded["model_state_dict"], loaded["margin"].centers.detach(), x)
    if name == "jem":
        return reference_jem_logits(loaded["model_state_dict"], x)
    return reference_cohen_cifar_logits(loaded["state_dict"], x)


@pytest.mark.parametrize("name", ["jem", "cohen"])
def test_cli_run_and_certify_finish_on_a_few_cifar10_images(name: str, cli_files: dict[str, Path],
                                                            tmp_path: Path) -> None:
    common = ["--model", name, "--dataset", "cifar10", "--data-dir", str(cli_files["data"]), "--checkpoint",
              str(cli_files[name]), "--device", "cpu", "--quiet", "--json"]
    run = CliRunner().invoke(main, ["run", *common, "--attack", "pgd", "--n", "3", "--eps", "0.01",
                                    "--no-large-eps-check", "--no-masking-checks", "--out", str(tmp_path / "run")])
    assert run.exit_code == 0, run.output
    summary = json.loads(run.stdout)
    assert (summary["model"], summary["dataset"], summary["n"]) == (name, "cifar10", 3)
    # The clean accuracy is that of the reference forward on the same three images.
    data = robusteval.load_dataset("cifar10", root=cli_files["data"])
    reference = reference_logits(name, cli_files[name], data.x[:3])
    assert summary["clean_accuracy"] == pytest.approx(float((reference.argmax(1) == data.y[:3]).float().mean()))
    certify = CliRunner().invoke(main, ["certify", *common, "--sigma", "0.25", "--n-images", "2", "--n0", "10",
                                        "--n", "40", "--batch-size", "50", "--no-compile",
                                        "--out", str(tmp_path / "certify")])
    assert certify.exit_code == 0, certify.output
    certified = json.loads(certify.stdout)
    assert (certified["model"], certified["n_images"], certified["sigma"]) == (name, 2, 0.25)
    assert len((tmp_path / "certify" / "samples.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("name", ["gmmc", "dmae"])
def test_cli_run_takes_the_gmmc_and_dmae_files(name: str, cli_files: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["run", "--model", name, "--dataset", "cifar10", "--data-dir",
                                       str(cli_files["data"]), "--checkpoint", str(cli_files[name]), "--attack", "fgsm",
                                       "--n", "4", "--eps", "0.01", "--no-large-eps-check", "--no-masking-checks",
                                       "--device", "cpu", "--quiet", "--json", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    data = robusteval.load_dataset("cifar10", root=cli_files["data"])
    expected = (reference_logits(name, cli_files[name], data.x[:4]).argmax(1) == data.y[:4]).float().mean()
    assert (summary["model"], summary["n"]) == (name, 4)
    assert summary["clean_accuracy"] == pytest.approx(float(expected))


def test_cli_predict_and_sample_take_the_official_files(cli_files: dict[str, Path], tmp_path: Path) -> None:
    predict = CliRunner().invoke(main, ["predict", "--model", "cohen", "--dataset", "cifar10", "--data-dir",
                                        str(cli_files["data"]), "--checkpoint", str(cli_files["cohen"]), "--sigma",
                                        "0.12", "--n-images", "2", "--n", "20", "--device", "cpu", "--no-compile",
                                        "--quiet", "--json", "--out", str(tmp_path / "predict")])
    assert predict.exit_code == 0, predict.output
    assert json.loads(predict.stdout)["n_images"] == 2
    out = tmp_path / "samples.png"
    sample = CliRunner().invoke(main, ["sample", "--model", "jem", "--dataset", "cifar10", "--checkpoint",
                                       str(cli_files["jem"]), "--n", "2", "--device", "cpu", "--out", str(out)])
    assert sample.exit_code == 0, sample.output
    assert out.is_file() and "2 class-conditional samples of jem" in sample.output


def test_model_cards_describe_the_official_architectures() -> None:
    cards = {card["name"]: card for card in json.loads(CliRunner().invoke(main, ["list", "models", "--json"]).stdout)}
    assert cards["jem"]["official"]["repository"] == "https://github.com/wgrathwohl/JEM"
    assert cards["jem"]["official"]["unsettled"], "the card must say what the official code leaves open"
    assert cards["cohen"]["official"]["datasets"] == ["cifar10", "imagenet"]
    assert cards["standard"]["official"] is None


def test_robusteval_own_weights_keep_the_re_implementation_on_paper_data_sets(tmp_path: Path) -> None:
    from robusteval.core.checkpoints import save_safetensors
    from robusteval.model_zoo.jem import JEM

    own = robusteval.create_model("jem", dataset="cifar10", pretrained=False, official=False)
    assert isinstance(own, JEM)  # what `robusteval train --model jem --dataset cifar10` trains
    path = tmp_path / "jem-cifar10.safetensors"
    save_safetensors(own, path)
    again = robusteval.create_model("jem", dataset="cifar10", checkpoint=path)
    assert isinstance(again, JEM)
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(again(x), own(x))
    meta = torch.device("meta")
    assert isinstance(robusteval.create_model("jem", dataset="cifar10", pretrained=False, device=meta), OfficialJEM)
    with pytest.raises(ValueError, match="no official architecture for data set 'digits'"):
        robusteval.create_model("jem", pretrained=False, official=True)
