"""Devices by name: `auto` (CUDA when present), cpu, cuda, cuda:N, mps, checked against this machine."""

from __future__ import annotations

import torch

from robusteval.core.errors import UsageError


class DeviceUnavailable(UsageError):
    """A device name that is unknown, unsupported, or not present on this machine."""


_DEVICE_HELP = "expected auto, cpu, cuda or cuda:N"


def device_label(device: torch.device) -> str:
    """Where work runs, as records name it: cuda:N with the index even when only "cuda" was asked for."""
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when it is available, else the CPU; others must exist here.

    cpu, cuda, cuda:N (N below the number of GPUs) and mps (where PyTorch has
    it) are accepted; anything else (tpu, meta, a cuda:7 on a machine with two
    GPUs) is a DeviceUnavailable saying what is there; cuda:N becomes the
    current CUDA device. A torch.device is taken as it is.
    """
    if isinstance(device, torch.device):
        return device  # a program's explicit choice (the meta device in tests); names come from users
    if device.strip() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device.strip())
    except (RuntimeError, ValueError):
        raise DeviceUnavailable(f"unknown device {str(device)!r}; {_DEVICE_HELP}") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceUnavailable(f"device {str(device)!r} was asked for but CUDA is not available here; "
                                    f"use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise DeviceUnavailable(f"device {str(device)!r} does not exist: this machine has {count} GPU(s), "
                                    f"cuda:0..cuda:{count - 1}")
        if parsed.index is not None:
            # Code that places tensors with a bare .cuda() or "cuda" (RobustBench's composite models) lands on
            # the current device: make it the one asked for, before anything is built.
            torch.cuda.set_device(parsed)
        return parsed
    if parsed.type == "mps":
        if torch.backends.mps.is_available():
            return parsed
        raise DeviceUnavailable(f"device {str(device)!r} was asked for but MPS is not available here; "
                                f"use --device cpu")
    raise DeviceUnavailable(f"device {str(device)!r} is not supported; {_DEVICE_HELP}")
