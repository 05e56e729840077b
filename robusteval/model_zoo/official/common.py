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
    # Lazily: a replay buffer (hundreds of MB) is read only if sampling needs it; the weights are copied at load.
    loaded = read_torch_file(path, allow_unsafe_pickle=allow_unsafe_pickle, lazy=True)
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


class ReplayImages:
    """A file's replay buffer of [-1, 1] images, shape-checked at load and read (and checked finite) only when
    sampling first needs it: certify and attacks never touch it."""

    def __init__(self, images: Any, path: str | Path, input_shape: tuple[int, ...], where: str = "replay_buffer"):
        self.path, self.where = path, where
        if not isinstance(images, Tensor) or not images.is_floating_point() or images.dim() != 4 \
                or tuple(images.shape[1:]) != tuple(input_shape) or len(images) == 0:
            found = (f"a {images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, Tensor)
                     else f"a {type(images).__name__}")
            raise CheckpointError(f"checkpoint {path}: '{where}' is {found}; expected float images of shape "
                                  f"(N, {', '.join(str(d) for d in input_shape)}) in [-1, 1], N >= 1")
        self._raw: Tensor | None = images
        self._images: Tensor | None = None

    def __len__(self) -> int:
        return len(self._raw) if self._raw is not None else len(self._images)

    def images(self) -> Tensor:
        """The buffer's images in [0, 1] (read from the file on first use)."""
        if self._images is None:
            assert self._raw is not None
            bad = ~torch.isfinite(self._raw.flatten(1)).all(dim=1)
            if bool(bad.any()):
                raise CheckpointError(
                    f"checkpoint {self.path}: '{self.where}' holds non-finite values (NaN or Inf) in "
                    f"{int(bad.sum())} of its {len(self._raw)} images; sampling cannot start its chains there")
            self._images = (self._raw.float() * 0.5 + 0.5).clamp(0.0, 1.0)
            self._raw = None
        return self._images
