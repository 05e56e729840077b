"""What the official-checkpoint loaders share: reading a file's parts and checking the data set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from robusteval.core.checkpoints import CheckpointError, read_torch_file
from robusteval.core.errors import UsageError
from robusteval.data import DatasetInfo


def read_official_file(path: str | Path, allow_unsafe_pickle: bool, expected_format: str) -> dict[str, Any]:
    """The file's top-level dict (restricted unpickling), or a clear error naming the expected format."""
    loaded = read_torch_file(path, allow_unsafe_pickle=allow_unsafe_pickle)
    if not isinstance(loaded, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(loaded).__name__}; expected {expected_format}")
    return loaded


# Where each paper's training script nests its state dict: JEM and GMMC, Cohen et al., DMAE (MAE's misc.save_model).
NESTINGS = ("model_state_dict", "state_dict", "model")


def official_state_dict(loaded: dict[str, Any], path: str | Path, expected_format: str) -> dict[str, Tensor]:
    """The state dict of a file: under the first official nesting key it has, else the file itself.

    Every paper's nesting is tried, so that a file of another paper reaches
    the key comparison, which says what differs.
    """
    where = next((key for key in NESTINGS if isinstance(loaded.get(key), dict)), None)
    state = loaded if where is None else loaded[where]
    return tensors_only(state, path, "the file" if where is None else f"'{where}'", expected_format)


def tensors_only(state: Any, path: str | Path, where: str, expected_format: str) -> dict[str, Tensor]:
    """`state` as a dict of tensors, or an error naming the expected format."""
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"checkpoint {path}: {where} is not a state dict of tensors; expected {expected_format}")
    return state


def require_dataset(model: str, info: DatasetInfo, supported: tuple[str, ...]) -> None:
    if info.name not in supported:
        raise UsageError(f"the official {model} architecture is defined for the data sets {', '.join(supported)}, "
                         f"not {info.name}")


def require_classes(path: str | Path, what: str, found: int, info: DatasetInfo) -> None:
    """The file's class count must be the data set's, before any work starts."""
    if found != info.num_classes:
        raise CheckpointError(f"checkpoint {path}: {what} has {found} classes but data set {info.name} has "
                              f"{info.num_classes}; is it a checkpoint for another data set?")
