"""Cohen et al.'s smoothing base classifiers (locuslab/smoothing `architectures.py`) under the JointModel contract.

The official network is `Sequential(NormalizeLayer(mean, std), net)`: the
normalisation is layer 0, inside the classifier, so that smoothing noise is
added in [0, 1] pixel space. `net` is `cifar_resnet20`/`cifar_resnet110`
for CIFAR-10 and torchvision's `resnet50` inside `DataParallel` for
ImageNet, hence the keys `1.*` and `1.module.*`. `train.py` saves
`{"epoch", "arch", "state_dict", "optimizer"}`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from robusteval.core.checkpoints import BATCHNORM_STEPS, CheckpointError, load_into
from robusteval.core.errors import UsageError
from robusteval.core.interface import JointModel
from robusteval.data import DatasetInfo
from robusteval.model_zoo.official.cifar_resnet import CifarResNet, cifar_resnet_size
from robusteval.model_zoo.official.common import (
    official_state_dict,
    read_official_file,
    require_classes,
    require_dataset,
)

DATASETS = ("cifar10", "imagenet")
FORMAT = ("a checkpoint of Cohen et al.'s train.py ({'epoch', 'arch', 'state_dict': Sequential(NormalizeLayer, net) "
          "keys '1.*' for cifar_resnet20/110 or '1.module.*' for ImageNet's resnet50, 'optimizer'})")
# datasets.py of locuslab/smoothing.
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class NormalizeLayer(nn.Module):
    """(x − mean)/std per channel; mean and std are not part of the official state dict."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class DataParallelNames(nn.Module):
    """Holds a network under `.module`, as `torch.nn.DataParallel` does, so its saved keys load as they are."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)


class CohenClassifier(JointModel):
    """A base classifier of randomized smoothing: logits = net(normalize(x)). σ is not an input."""

    capabilities = frozenset({"logits"})

    def __init__(self, info: DatasetInfo, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.num_classes = info.num_classes
        self.input_shape = info.input_shape
        self.net = nn.Sequential(NormalizeLayer(mean, std), net)

    def _logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.net(x)


def _torchvision_resnet(depth_key: tuple[bool, tuple[int, ...]], num_classes: int) -> nn.Module:
    from torchvision.models.resnet import (  # deferred: torchvision costs seconds to import
        BasicBlock,
        Bottleneck,
        ResNet,
    )

    bottleneck, layers = depth_key
    return ResNet(Bottleneck if bottleneck else BasicBlock, list(layers), num_classes=num_classes)


def build_cohen(info: DatasetInfo) -> CohenClassifier:
    """The published configurations with random weights: cifar_resnet110 (CIFAR-10), resnet50 (ImageNet);
    on other data sets a ResNet-20 of the same design (normalisation by mean 0, std 1)."""
    if info.name == "imagenet":
        net: nn.Module = DataParallelNames(_torchvision_resnet((True, (3, 4, 6, 3)), info.num_classes))
    elif info.name == "cifar10":
        net = CifarResNet(110, info.num_classes)
    else:
        channels, height, width = info.input_shape
        if height != width:
            raise UsageError(f"the CIFAR ResNet needs square images, data set {info.name} has {info.input_shape}")
        net = CifarResNet(20, info.num_classes, in_channels=channels, input_size=height)
    mean, std = MEAN_STD.get(info.name, ((0.0,) * info.input_shape[0], (1.0,) * info.input_shape[0]))
    return CohenClassifier(info, net, mean, std)


def load_cohen(info: DatasetInfo, path: str | Path, allow_unsafe_pickle: bool = False) -> CohenClassifier:
    """A train.py checkpoint; the ResNet's depth (blocks per stage, basic or bottleneck) is read from the file."""
    require_dataset("Cohen et al.", info, DATASETS)
    loaded = read_official_file(path, allow_unsafe_pickle, FORMAT)
    state = official_state_dict(loaded, path, FORMAT)
    mean, std = MEAN_STD[info.name]
    if "1.module.conv1.weight" in state:
        if info.name != "imagenet":
            raise CheckpointError(f"checkpoint {path} holds an ImageNet ResNet (keys '1.module.*', 224×224 inputs) "
                                  f"but data set {info.name} has images of shape {info.input_shape}")
        bottleneck = "1.module.layer1.0.conv3.weight" in state
        layers = tuple(_blocks(state, f"1.module.layer{stage}.") for stage in (1, 2, 3, 4))
        if min(layers) < 1:
            raise CheckpointError(f"checkpoint {path}: blocks per stage {layers}; a torchvision ResNet has at least "
                                  f"one block in each of its four stages")
        classes = int(state["1.module.fc.weight"].shape[0])
        require_classes(path, "1.module.fc", classes, info)
        net: nn.Module = DataParallelNames(_torchvision_resnet((bottleneck, layers), classes))
    elif "1.conv1.weight" in state:
        if info.name != "cifar10":
            raise CheckpointError(f"checkpoint {path} holds a CIFAR ResNet (keys '1.*', 32×32 inputs) but data set "
                                  f"{info.name} has images of shape {info.input_shape}")
        depth, bottleneck, classes = cifar_resnet_size(state, "1.")
        require_classes(path, "1.fc", classes, info)
        net = CifarResNet(depth, classes, bottleneck=bottleneck)
    else:
        # Not sizable: name the keys that differ from the published configuration (built without memory).
        with torch.device("meta"):
            published = build_cohen(info)
        load_into(published.net, state, str(path), FORMAT, optional=BATCHNORM_STEPS)
    model = CohenClassifier(info, net, mean, std)
    load_into(model.net, state, str(path), FORMAT, optional=BATCHNORM_STEPS)
    return model.eval()  # as create_model: a direct caller must not get BatchNorm on batch statistics


def _blocks(state: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.conv1\.weight$")
    return 1 + max((int(m.group(1)) for key in state if (m := pattern.match(key))), default=-1)
