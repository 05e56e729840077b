"""How much work one forward pass holds, by device: the CPU sizes the records were made with, GPU sizes
that keep a GPU busy.

A GPU runs a forward pass of a small network in about the time it takes to launch it, so a pass must
hold many more inputs than on a CPU core before the work, not the launches, dominates. The sizes only
change speed where the results do not depend on them (certification's noise is addressed per draw;
EOT's stacked draws on a GPU come from its own generator); the denoise batch also fixes which noise each
image gets, so it is part of that run's configuration and a run moved between devices keeps its
--batch-size.
"""

from __future__ import annotations

import torch

# (image, draw) pairs per certification pass: 1,000 on a CPU core.
CPU_CERTIFY_BATCH = 1000
# On a GPU: 10,000 pairs, fewer for large images, so that one pass's inputs stay under 256 MiB of float32.
GPU_CERTIFY_BATCH = 10_000
GPU_PASS_VALUES = 1 << 26
# Images per forward pass when EOT stacks many noise draws into one batch.
CPU_STACKED_IMAGES = 4096
GPU_STACKED_IMAGES = 32_768
# Images per denoise batch.
CPU_DENOISE_BATCH = 100
GPU_DENOISE_BATCH = 1000


def _on_gpu(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def certify_batch(device: torch.device | str, input_shape: tuple[int, ...]) -> int:
    """The default (image, draw) pairs per certification pass on `device`."""
    if not _on_gpu(device):
        return CPU_CERTIFY_BATCH
    values = 1
    for size in input_shape:
        values *= int(size)
    return max(CPU_CERTIFY_BATCH, min(GPU_CERTIFY_BATCH, GPU_PASS_VALUES // max(values, 1)))


def stacked_images(device: torch.device | str) -> int:
    """Images per forward pass when noise draws are stacked (EOT, randomized decisions)."""
    return GPU_STACKED_IMAGES if _on_gpu(device) else CPU_STACKED_IMAGES


def denoise_batch(device: torch.device | str) -> int:
    """The default images per denoise batch on `device`."""
    return GPU_DENOISE_BATCH if _on_gpu(device) else CPU_DENOISE_BATCH
