"""The CIFAR ResNet of Cohen et al.'s smoothing code (locuslab/smoothing `archs/cifar_resnet.py`).

He et al.'s CIFAR ResNet: conv1 (3×3, 16, no bias), BN, ReLU; three stages
of n blocks of widths 16, 32, 64 (strides 1, 2, 2; a 1×1 conv + BN
`downsample` where the shape changes); average pooling over the last 8×8
map; `fc`. BasicBlocks give depth 6n + 2 (`cifar_resnet20`: n = 3,
`cifar_resnet110`: n = 18); the file's Bottleneck option (depth 9n + 2,
expansion 4) is supported too. The official pooling is `AvgPool2d(8)`;
here its kernel is the input size / 4, which is 8 for CIFAR's 32×32 and
lets the same network run on smaller images.
"""

from __future__ import annotations

import re

from torch import Tensor, nn

from robusteval.core.errors import UsageError


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 110, num_classes: int = 10, bottleneck: bool = False, in_channels: int = 3,
                 input_size: int = 32):
        super().__init__()
        per_block = 9 if bottleneck else 6
        if depth < per_block + 2 or (depth - 2) % per_block:
            raise UsageError(f"CIFAR ResNet depth must be {per_block}n + 2 with n >= 1, got {depth}")
        if input_size % 4:
            raise UsageError(f"CIFAR ResNet needs an input size divisible by 4, got {input_size}")
        block = Bottleneck if bottleneck else BasicBlock
        blocks = (depth - 2) // per_block
        self.in_planes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(block, 16, blocks, 1)
        self.layer2 = self._make_layer(block, 32, blocks, 2)
        self.layer3 = self._make_layer(block, 64, blocks, 2)
        self.avgpool = nn.AvgPool2d(input_size // 4)
        self.fc = nn.Linear(64 * block.expansion, num_classes)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_planes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.in_planes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.in_planes, planes, stride, downsample)]
        self.in_planes = planes * block.expansion
        layers += [block(self.in_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def cifar_resnet_size(state: dict[str, Tensor], prefix: str) -> tuple[int, bool, int]:
    """(depth, bottleneck, classes) read from a file's shapes."""
    pattern = re.compile(rf"^{re.escape(prefix)}layer1\.(\d+)\.conv1\.weight$")
    indices = [int(m.group(1)) for key in state if (m := pattern.match(key))]
    if not indices:
        raise KeyError(f"{prefix}layer1.0.conv1.weight")
    bottleneck = f"{prefix}layer1.0.conv3.weight" in state
    blocks = 1 + max(indices)
    return (9 if bottleneck else 6) * blocks + 2, bottleneck, int(state[f"{prefix}fc.weight"].shape[0])
