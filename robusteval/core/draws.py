"""Random draws from a caller's generator, on the generator's own device, then moved where they are used.

A torch.Generator draws only on its device: torch.randn(..., generator=g) on the
CPU with a CUDA generator raises. Samplers therefore draw where the generator
lives (the CPU when none is given: the default CPU generator) and move the
result. A CPU generator gives the same images on every device; a CUDA one
gives that GPU's stream (reproducible on that GPU model).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _source(generator: torch.Generator | None) -> torch.device:
    return torch.device("cpu") if generator is None else generator.device


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal draws of `shape` from `generator`, on `device`."""
    return torch.randn(shape, generator=generator, dtype=dtype, device=_source(generator)).to(device)


def rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str,
         dtype: torch.dtype = torch.float32) -> Tensor:
    """U[0, 1) draws of `shape` from `generator`, on `device`."""
    return torch.rand(shape, generator=generator, dtype=dtype, device=_source(generator)).to(device)
