"""BPDA's backward pass (Athalye et al. 2018): a value computed one way, differentiated another.

`backward_through(approximation, value)` returns `value` on the forward pass
and sends its gradient to `approximation` on the backward pass. With the
input itself as the approximation this is the identity backward of BPDA
(a denoiser, an SGLD chain or a user's preprocessing differentiated as
x ↦ x); with a differentiable stand-in g(x) it is BPDA with g.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _BackwardThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, approximation: Tensor, value: Tensor) -> Tensor:  # type: ignore[override]
        return value

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def backward_through(approximation: Tensor, value: Tensor) -> Tensor:
    """`value` (detached) forward, with the gradient of `approximation` (same shape) backward."""
    return _BackwardThrough.apply(approximation, value.detach())
