"""Deterministic GPU arithmetic on request: the `--deterministic` option of every evaluation.

On: torch.use_deterministic_algorithms(True) (warn-only), cuDNN deterministic and not
benchmarking, TF32 off for matmuls and convolutions, and cuBLAS given the
fixed workspace its deterministic mode needs. A resumed run then reproduces an
uninterrupted one on the same GPU model and software, and GPU figures stay
float32 figures (TF32 rounds products to 10 mantissa bits). Off: PyTorch's
defaults, which are faster on a GPU but may differ in the last digits from run
to run and from the CPU-made records. CPU arithmetic is deterministic either way.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NONDETERMINISTIC_NOTE = ("run without --deterministic: on a GPU, figures may differ in the last digits between "
                         "runs and from CPU-made records")


def set_deterministic(on: bool) -> None:
    """Switch deterministic algorithms (and TF32 off) on, or back to PyTorch's defaults."""
    if on:
        # cuBLAS reads this when it makes its handle; set before the first GPU matmul of the process.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: an operation without a deterministic kernel (in a third-party attack, say) warns, naming
    # itself, rather than failing a long run; the zoo's own models have none (see AdaptiveAvgPool2d below).
    # Only on a change: the call imports torch._inductor (1.8 s, most of a short certify call's own time).
    if (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) != \
            (on, on):
        torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default too
    torch.backends.cudnn.allow_tf32 = not on  # PyTorch's default is True


def is_deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()


def gpu_notes(device: torch.device) -> list[str]:
    """The summary note a run on a GPU without deterministic algorithms carries (none otherwise)."""
    return [NONDETERMINISTIC_NOTE] if torch.device(device).type != "cpu" and not is_deterministic() else []


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """nn.AdaptiveAvgPool2d whose backward is deterministic on CUDA when deterministic algorithms are on.

    CUDA's adaptive average pooling backward has no deterministic kernel (PyTorch raises in
    deterministic mode); where the output size divides the input, it is exactly a fixed-window
    average pooling, whose backward has one. The CPU path is unchanged (the same bits as before).
    """

    def forward(self, x: Tensor) -> Tensor:
        size = self.output_size if isinstance(self.output_size, tuple) else (self.output_size, self.output_size)
        height, width = x.shape[-2:]
        if (x.device.type == "cuda" and is_deterministic() and None not in size
                and height % size[0] == 0 and width % size[1] == 0):
            return F.avg_pool2d(x, (height // size[0], width // size[1]))
        return super().forward(x)
