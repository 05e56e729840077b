"""The Wide ResNet of JEM and GMMC (wgrathwohl/JEM `wideresnet.py`), with the official module names.

With `norm=None` (both papers' published runs) the official network is:
conv1 (3×3, 16 channels, with bias); three stages of (depth − 4)/6
pre-activation blocks of widths 16k, 32k, 64k (LeakyReLU 0.2, 3×3 convs
with bias, no normalisation layers, the second conv carries the stage's
stride, a 1×1 conv with bias as shortcut where the shape changes);
LeakyReLU, 8×8 average pooling, and a 64k-dimensional feature vector.
JEM's copy also has a `linear` layer (always 10 outputs: JEM never passes
its class count down) that no forward pass uses; GMMC's copy removed it.
"""

from __future__ import annotations

import re

import torch.nn.functional as F
from torch import Tensor, nn

from robusteval.core.errors import UsageError

LEAK = 0.2


class WideBasic(nn.Module):
    """One pre-activation block; the norm and dropout slots of the official block hold no weights."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.lrelu = nn.LeakyReLU(LEAK)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=True))

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.lrelu(x))
        out = self.conv2(self.lrelu(out))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """WRN-depth-k feature extractor: (B, 3, 32, 32) in the official [-1, 1] scale → (B, 64k)."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, linear_outputs: int | None = 10):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise UsageError(f"Wide ResNet depth must be 6n + 4 with n >= 1, got {depth}")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.depth, self.widen_factor = depth, widen_factor
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=True)
        in_planes = widths[0]
        stages = []
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            layers = []
            for index in range(blocks):
                layers.append(WideBasic(in_planes, planes, stride if index == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.lrelu = nn.LeakyReLU(LEAK)
        self.last_dim = widths[3]
        # Present in JEM's files, unused by any forward pass.
        self.linear = nn.Linear(widths[3], linear_outputs) if linear_outputs else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = F.avg_pool2d(self.lrelu(out), 8)
        return out.flatten(1)


def wrn_size(state: dict[str, Tensor], prefix: str = "f.") -> tuple[int, int, int | None]:
    """(depth, widen factor, outputs of the unused `linear` or None) read from a file's shapes."""
    first = state.get(f"{prefix}layer1.0.conv1.weight")
    if first is None:
        raise KeyError(f"{prefix}layer1.0.conv1.weight")
    widen_factor, remainder = divmod(int(first.shape[0]), 16)
    if remainder or widen_factor < 1:
        raise UsageError(f"{prefix}layer1.0.conv1.weight has {first.shape[0]} output channels, not a multiple of 16")
    pattern = re.compile(rf"^{re.escape(prefix)}layer1\.(\d+)\.conv1\.weight$")
    blocks = 1 + max(int(m.group(1)) for key in state if (m := pattern.match(key)))
    linear = state.get(f"{prefix}linear.weight")
    return 6 * blocks + 4, widen_factor, (int(linear.shape[0]) if linear is not None else None)
