"""Saving and loading weights safely, with sha256 verification.

Shipped checkpoints are safetensors files: they hold tensors only and cannot
run code on load. `.pt` files load with `torch.load(weights_only=True)`;
the papers' own files (`read_torch_file`) additionally admit exactly
`argparse.Namespace` and GMMC's `LDALayer` (reduced to its centres).
Arbitrary unpickling needs the explicit `allow_unsafe_pickle=True`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import re
import struct
import types
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from robusteval.core.atomic_files import atomic_write_bytes
from robusteval.core.errors import UsageError


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the model."""


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of a module's weights (its state dict), so a run directory is never resumed with other weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_safetensors(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> str:
    """Save the model's state dict as safetensors (atomically); return its sha256."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, _metadata_in_given_order(save(state, metadata=metadata), metadata))
    return sha256_of(path)


def _metadata_in_given_order(data: bytes, metadata: dict[str, str] | None) -> bytes:
    """Rewrite a safetensors header with its metadata in the caller's order.

    safetensors keeps the metadata in a hash map, so its order in the header
    (and the file's sha256) changes from one save to the next; equal weights
    must give equal bytes for `robusteval train` to reproduce a shipped file.
    """
    if not metadata:
        return data
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    ordered = {"__metadata__": {key: header["__metadata__"][key] for key in metadata}}
    ordered.update((key, value) for key, value in header.items() if key != "__metadata__")
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def read_state_dict(
    path: str | Path,
    expected_sha256: str | None = None,
    allow_unsafe_pickle: bool = False,
    nested_keys: tuple[str, ...] = ("state_dict",),
) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch file, verifying sha256 when given.

    A torch file may wrap the state dict in a dict (training checkpoints keep
    it under 'state_dict' beside the optimiser); the first of `nested_keys`
    that holds a dict is descended into, repeatedly.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if expected_sha256 is not None:
        actual = sha256_of(path)
        if actual != expected_sha256:
            raise CheckpointError(
                f"checkpoint {path} failed verification: sha256 is {actual}, the model card expects "
                f"{expected_sha256}. The file is corrupt or was replaced; re-create it with "
                f"`robusteval train` or restore it from the repository."
            )
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types
            raise CheckpointError(f"checkpoint {path} is not a valid safetensors file: {error}") from error
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=not allow_unsafe_pickle)
    except Exception as error:
        hint = (
            " It may need arbitrary unpickling; only if you trust its source, pass "
            "allow_unsafe_pickle=True (CLI: --allow-unsafe-pickle)."
            if not allow_unsafe_pickle
            else ""
        )
        raise CheckpointError(f"could not load checkpoint {path}: {error}.{hint}") from error
    if isinstance(loaded, nn.Module):
        loaded = loaded.state_dict()
    while isinstance(loaded, dict):
        inner = next((key for key in nested_keys if isinstance(loaded.get(key), dict)), None)
        if inner is None:
            break
        loaded = loaded[inner]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    return loaded


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file (robusteval writes the model and the data set it was trained on);
    empty for other files or when there is none."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint {path} is not a valid safetensors file: {error}") from error


# BatchNorm's step counter: files from before torch 0.4.1 lack it, and inference never reads it.
BATCHNORM_STEPS = ("num_batches_tracked",)


def load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str, expected_format: str | None = None,
              optional: tuple[str, ...] = ()) -> None:
    """Load `state` into `module` strictly; a mismatch names the first differing keys and shapes.

    The message says what the file is not: `expected_format` (an official file's layout) or else the
    architecture of `module`. Keys of `module` whose last name is in `optional` may be absent from the file
    (BatchNorm's step counter, which files from before torch 0.4.1 lack and which inference never reads);
    they keep the module's value.
    """
    own = module.state_dict()
    missing = sorted(k for k in set(own) - set(state) if k.rsplit(".", 1)[-1] not in optional)
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs architecture {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                         f"({len(unexpected)} in all)")
        if wrong_shape:
            parts.append(f"shape mismatches {wrong_shape[:5]}")
        what = (f"is not {expected_format}" if expected_format is not None
                else f"does not match the architecture of {type(module).__name__}")
        raise CheckpointError(f"checkpoint {source} {what}: " + "; ".join(parts))
    module.load_state_dict({**{k: v for k, v in own.items() if k not in state}, **state}, strict=True)


# --- the papers' own .pt files ---------------------------------------------------------------------


class UnsafePickleError(CheckpointError):
    """A checkpoint pickles an object that the restricted unpickler does not admit."""


class PickledLDALayer:
    """What robusteval keeps of GMMC's pickled `LDALayer` module: its `centers` tensor, nothing else.

    GMMC's training script saves the whole `LDALayer` module under "margin".
    Unpickling it as itself would import GMMC's code; this stand-in receives
    the module's state and keeps only the Max-Mahalanobis centres.
    """

    centers: torch.Tensor

    def __setstate__(self, state: Any) -> None:
        parameters = state.get("_parameters") if isinstance(state, dict) else None
        centers = parameters.get("centers") if isinstance(parameters, dict) else None
        if not isinstance(centers, torch.Tensor) or centers.dim() != 2:
            raise pickle.UnpicklingError("GMMC's pickled LDALayer holds no 2-d 'centers' parameter")
        self.centers = centers.detach().clone()


# The objects the papers' formats need beyond what torch's weights_only unpickler admits (tensors,
# containers, numbers, strings): DMAE's training arguments and GMMC's centres module.
_OFFICIAL_GLOBALS: list[Any] = [argparse.Namespace, (PickledLDALayer, "LDALayer.LDALayer")]
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")


class _StandInUnpickler(pickle.Unpickler):
    """Full unpickling (only with allow_unsafe_pickle) that still maps GMMC's LDALayer to its stand-in."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("LDALayer", "LDALayer"):
            return PickledLDALayer
        return super().find_class(module, name)


def _stand_in_pickle_module() -> Any:
    module = types.ModuleType("robusteval_stand_in_pickle")
    module.Unpickler = _StandInUnpickler  # type: ignore[attr-defined]
    module.load = lambda handle, **kwargs: _StandInUnpickler(handle, **kwargs).load()  # type: ignore[attr-defined]
    module.__dict__.update({k: getattr(pickle, k) for k in ("UnpicklingError", "HIGHEST_PROTOCOL")})
    return module


def read_torch_file(path: str | Path, allow_unsafe_pickle: bool = False) -> Any:
    """Everything a torch `.pt`/`.pth` file holds, unpickled by the restricted unpickler.

    Admitted: what `torch.load(weights_only=True)` admits (tensors, dicts,
    lists, tuples, numbers, strings), `argparse.Namespace` and GMMC's
    `LDALayer`, reduced to a `PickledLDALayer` holding its centres. Anything
    else is an `UnsafePickleError` naming the class; `allow_unsafe_pickle`
    unpickles everything (only for files whose source you trust).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if allow_unsafe_pickle:
        try:
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_stand_in_pickle_module())
        except Exception as error:
            raise CheckpointError(f"could not load checkpoint {path}: {error}") from error
    try:
        with torch.serialization.safe_globals(_OFFICIAL_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = _REFUSED_GLOBAL.search(str(error))
        what = f"the class/function '{found.group(1)}'" if found else f"an object robusteval does not admit ({error})"
        raise UnsafePickleError(
            f"checkpoint {path} pickles {what}, which robusteval refuses to unpickle: loading it could run "
            f"arbitrary code. Only tensors, plain containers, argparse.Namespace and GMMC's LDALayer are admitted. "
            f"If you trust the file's source, pass allow_unsafe_pickle=True (CLI: --allow-unsafe-pickle)."
        ) from None
    except Exception as error:
        raise CheckpointError(f"could not load checkpoint {path}: {error}") from error
