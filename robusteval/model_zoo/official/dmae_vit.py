"""DMAE's fine-tuned ViT classifiers (quanlin-wu/dmae `models_vit.py`) under the JointModel contract.

`models_vit.VisionTransformer` is timm's ViT whose `forward_features`
normalises its input (ImageNet mean/std; CIFAR-10's for the CIFAR-10
fine-tune), and with `global_pool` (the default of every DMAE script)
averages the patch tokens and applies `fc_norm` instead of the final
`norm`. ViT-B/16 and ViT-L/16: patch 16, qkv bias, LayerNorm eps 1e-6,
MLP ratio 4, 224×224 inputs. For CIFAR-10 the smoothing noise is added to
the 32×32 image in [0, 1], which is then resized bicubically to 224
(`util/smooth.py`, `engine_finetune.py`) and normalised. The fine-tuning
scripts save MAE's `{"model", "optimizer", "epoch", "scaler", "args"}`
with `args` an `argparse.Namespace`.

Here the ViT is timm's own `VisionTransformer` with `global_pool="avg"`
(patch-token mean, `fc_norm`), which computes what DMAE's subclass computes;
the normalisation and resizing live in this wrapper.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from robusteval.core.checkpoints import BATCHNORM_STEPS, load_into
from robusteval.core.interface import JointModel
from robusteval.data import DatasetInfo
from robusteval.model_zoo.official.common import (
    official_state_dict,
    read_official_file,
    require_classes,
    require_dataset,
)

logger = logging.getLogger(__name__)

DATASETS = ("cifar10", "imagenet")
FORMAT = ("a DMAE fine-tuning checkpoint ({'model': timm ViT state dict with fc_norm.* and head.*, 'args': "
          "argparse.Namespace, 'optimizer', 'epoch', 'scaler'})")
MEAN_STD = {  # models_vit.py (ImageNet) and finetune_cifar10.py / certify_cifar10.py (CIFAR-10)
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
}
# models_vit.py's constructors: (embed dim, depth, heads, patch).
OFFICIAL_SIZES = {
    "vit_base_patch16": (768, 12, 12, 16),
    "vit_large_patch16": (1024, 24, 16, 16),
    "vit_huge_patch14": (1280, 32, 16, 14),
}
# Keys of the pre-training model (models_dmae.py) that a classifier has no use for.
PRETRAINING_ONLY = re.compile(r"^(decoder_|mask_token$)")


class _ScheduleOnCPU(TorchFunctionMode):
    """timm reads its drop-path schedule with .item(); keep that small tensor on the CPU so the ViT can be built on
    the meta device (full-size configurations without memory)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = dict(kwargs or {})
        if func is torch.linspace:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def vision_transformer(embed_dim: int, depth: int, num_heads: int, patch_size: int, num_classes: int,
                       img_size: int = 224, mlp_ratio: float = 4.0, global_pool: bool = True) -> nn.Module:
    """timm's ViT configured as models_vit.py's constructors (no download, random weights)."""
    # deferred: timm costs ~4 s to import
    from timm.models.vision_transformer import VisionTransformer

    with _ScheduleOnCPU():
        return VisionTransformer(
            img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=num_classes,
            global_pool="avg" if global_pool else "token",
        )


class DMAEClassifier(JointModel):
    """logits = ViT(normalize(resize(x))): resizing (bicubic, to the ViT's input size) only when sizes differ."""

    capabilities = frozenset({"logits"})

    def __init__(self, info: DatasetInfo, vit: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.num_classes = info.num_classes
        self.input_shape = info.input_shape
        self.vit = vit
        self.vit_size = tuple(vit.patch_embed.img_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def _logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.vit_size:
            # torchvision's tensor Resize(BICUBIC) as DMAE ran it: interpolate without antialiasing.
            x = F.interpolate(x, size=self.vit_size, mode="bicubic", align_corners=False)
        return self.vit((x - self.mean) / self.std)


def build_dmae(info: DatasetInfo, size: str = "vit_base_patch16") -> DMAEClassifier:
    """A published configuration (ViT-B/16 by default, as the CIFAR-10 fine-tune) with random weights."""
    require_dataset("DMAE", info, DATASETS)
    embed_dim, depth, heads, patch = OFFICIAL_SIZES[size]
    mean, std = MEAN_STD[info.name]
    return DMAEClassifier(info, vision_transformer(embed_dim, depth, heads, patch, info.num_classes), mean, std)


def _num_heads(embed_dim: int, args: object) -> int:
    """Heads do not show in the shapes: the file's args.model names the official constructor; else by width."""
    name = getattr(args, "model", None)
    if isinstance(name, str) and name in OFFICIAL_SIZES and OFFICIAL_SIZES[name][0] == embed_dim:
        return OFFICIAL_SIZES[name][2]
    for official_dim, _depth, heads, _patch in OFFICIAL_SIZES.values():
        if official_dim == embed_dim:
            return heads
    return max(1, embed_dim // 64)  # timm's and MAE's 64-dimensional heads


def load_dmae(info: DatasetInfo, path: str | Path, allow_unsafe_pickle: bool = False) -> DMAEClassifier:
    """A DMAE fine-tuning checkpoint; the ViT's width, depth, patch, MLP ratio and input size come from its shapes."""
    require_dataset("DMAE", info, DATASETS)
    loaded = read_official_file(path, allow_unsafe_pickle, FORMAT)
    state = dict(official_state_dict(loaded, path, FORMAT))
    dropped = sorted(key for key in state if PRETRAINING_ONLY.match(key))
    if dropped:
        logger.warning("%s: ignoring %d pre-training-only entries (%s): the classifier has no decoder",
                       path, len(dropped), ", ".join(dropped[:3]) + (" ..." if len(dropped) > 3 else ""))
        for key in dropped:
            del state[key]
    args = loaded.get("args")
    mean, std = MEAN_STD[info.name]
    backbone = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    if not all(key in state for key in backbone):
        with torch.device("meta"):
            published = build_dmae(info)
        load_into(published.vit, state, str(path), FORMAT, optional=BATCHNORM_STEPS)
    embed_dim = int(state["cls_token"].shape[-1])
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    depth = 1 + max(int(m.group(1)) for key in state if (m := re.match(r"^blocks\.(\d+)\.", key)))
    grid = math.isqrt(int(state["pos_embed"].shape[1]) - 1)
    mlp_ratio = int(state["blocks.0.mlp.fc1.weight"].shape[0]) / embed_dim
    has_head = "head.weight" in state
    classes = int(state["head.weight"].shape[0]) if has_head else info.num_classes
    if has_head:
        require_classes(path, "head", classes, info)
    # DMAE's scripts default to global pooling (fc_norm); --cls_token fine-tunes keep the final norm instead.
    if isinstance(args, argparse.Namespace) and isinstance(getattr(args, "global_pool", None), bool):
        global_pool = args.global_pool
    else:
        global_pool = "fc_norm.weight" in state or not has_head
    vit = vision_transformer(embed_dim, depth, _num_heads(embed_dim, args), patch, classes, img_size=grid * patch,
                             mlp_ratio=mlp_ratio, global_pool=global_pool)
    model = DMAEClassifier(info, vit, mean, std)
    load_into(model.vit, state, str(path), FORMAT, optional=BATCHNORM_STEPS)
    return model.eval()  # as create_model: a direct caller must not get BatchNorm on batch statistics
