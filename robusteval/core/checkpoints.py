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
import warnings
import zipfile
from collections.abc import Iterator
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
    require_checkpoint_file(path)
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
            raise CheckpointError(f"checkpoint {path} is not a valid safetensors file: {_first_line(error)}") from error
    # The restricted unpickler of the papers' files: a refused class is one line naming it and the way out
    # (a PyTorch Lightning checkpoint, e.g. latent diffusion's model.ckpt, may pickle Lightning's classes).
    loaded = read_torch_file(path, allow_unsafe_pickle=allow_unsafe_pickle)
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


def require_checkpoint_file(path: Path, flag: str = "checkpoint") -> None:
    """A clear error unless `path` is a non-empty regular file (a device such as /dev/zero is not one)."""
    if not path.exists():
        raise CheckpointError(f"{flag} not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{flag} {path} is not a regular file (a directory, device or pipe); expected a "
                              f"weights file (.safetensors or .pt)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{flag} {path} is empty (0 bytes); expected a weights file (.safetensors or .pt)")


def _first_line(error: BaseException) -> str:
    """The first sentence of an error's text: PyTorch's and safetensors' messages run over many lines."""
    text = " ".join(str(error).split())
    return (text.split(". ")[0].rstrip(".") or type(error).__name__)


# Where a pickle's opcode is one torch.save never writes, torch's weights_only unpickler says so in this form.
_UNSUPPORTED_OPERAND = re.compile(r"Unsupported operand (\d+)")


def _load_torch(path: Path, allow_unsafe_pickle: bool, admitted: list[Any], what: str, lazy: bool = False,
                pickle_module: Any = None) -> Any:
    """torch.load with one-line errors; tensors declaring more data than the file holds are refused.

    `admitted`: the classes the restricted unpickler admits beyond torch's (named in the refusal as `what`).
    `lazy`: map the file's tensors (zip files only) instead of reading them, so that data nothing uses
    (a replay buffer certify never samples from) is never read.
    """
    mmap = lazy and zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():
            # torch warns in several lines about a plain pickle's protocol; the error below says it in one.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            if allow_unsafe_pickle:
                extra = {"pickle_module": pickle_module} if pickle_module is not None else {}
                loaded = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap, **extra)
            else:
                with torch.serialization.safe_globals(admitted):
                    loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if allow_unsafe_pickle:
            raise CheckpointError(f"could not load checkpoint {path}: {_first_line(error)}") from error
        found = _REFUSED_GLOBAL.search(str(error))
        operand = _UNSUPPORTED_OPERAND.search(str(error))
        if found:
            raise UnsafePickleError(
                f"checkpoint {path} pickles the class/function '{found.group(1)}', which robusteval refuses to "
                f"unpickle: loading it could run arbitrary code. Only {what} are admitted. If you trust the file's "
                f"source, pass allow_unsafe_pickle=True (CLI: --allow-unsafe-pickle)."
            ) from None
        if operand:
            raise CheckpointError(
                f"checkpoint {path} is not a file torch.save writes: its pickle uses opcode {operand.group(1)}, "
                f"which torch.save never writes (a plain pickle.dump file?); save the weights with torch.save "
                f"or safetensors"
            ) from None
        raise CheckpointError(f"could not load checkpoint {path}: {_first_line(error)}") from None
    except Exception as error:
        raise CheckpointError(f"could not load checkpoint {path}: the file is truncated or not a torch checkpoint "
                              f"({_first_line(error)})") from None
    _check_declared_sizes(loaded, path)
    return loaded


def _tensors_in(value: Any, where: str, depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of an unpickled file's containers, with where it sits ('replay_buffer', 'state_dict.w')."""
    if isinstance(value, torch.Tensor):
        yield where, value
    elif depth < 8 and isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors_in(item, f"{where}.{key}" if where else str(key), depth + 1)
    elif depth < 8 and isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors_in(item, f"{where}[{index}]", depth + 1)


def _size(nbytes: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    raise AssertionError("unreachable")


def _check_declared_sizes(loaded: Any, path: Path) -> None:
    """Refuse a tensor that declares more data than the whole file holds.

    Such a tensor repeats a small storage (stride 0): 1,000 bytes can declare terabytes, which the first
    operation on it would try to allocate. No checkpoint a training script writes holds one.
    """
    file_size = path.stat().st_size
    for where, tensor in _tensors_in(loaded, ""):
        declared = tensor.numel() * tensor.element_size()
        if declared > file_size:
            raise CheckpointError(
                f"checkpoint {path}: '{where}' declares a {tuple(tensor.shape)} tensor ({_size(declared)}), more "
                f"than the whole file holds ({_size(file_size)}); refused before reading it"
            )


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


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or ±Inf, naming the first such tensor: such a model answers one class for
    every input, which smoothing would certify and attacks would report as robust."""
    for name, tensor in state.items():
        if tensor.is_floating_point() or tensor.is_complex():
            bad = ~torch.isfinite(tensor)
            if bool(bad.any()):
                raise CheckpointError(f"checkpoint {source}: tensor {name} holds {int(bad.sum())} non-finite "
                                      f"value(s) (NaN or Inf) of {tensor.numel()}; the weights are corrupt or "
                                      f"diverged, so nothing evaluated with them would mean anything")


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
    # A float weight given as integers would be cast silently (an int64 tensor of rounded weights, or of garbage).
    wrong_type = [f"{k}: file {state[k].dtype} vs architecture {own[k].dtype}" for k in own
                  if k in state and own[k].is_floating_point() and not state[k].is_floating_point()]
    if missing or unexpected or wrong_shape or wrong_type:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
                         f"({len(unexpected)} in all)")
        if wrong_shape:
            parts.append(f"shape mismatches {wrong_shape[:5]}")
        if wrong_type:
            parts.append(f"integer tensors where the architecture holds float weights {wrong_type[:5]} "
                         f"({len(wrong_type)} in all)")
        what = (f"is not {expected_format}" if expected_format is not None
                else f"does not match the architecture of {type(module).__name__}")
        raise CheckpointError(f"checkpoint {source} {what}: " + "; ".join(parts))
    check_finite(state, source)
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


def read_torch_file(path: str | Path, allow_unsafe_pickle: bool = False, lazy: bool = False) -> Any:
    """Everything a torch `.pt`/`.pth` file holds, unpickled by the restricted unpickler.

    Admitted: what `torch.load(weights_only=True)` admits (tensors, dicts,
    lists, tuples, numbers, strings), `argparse.Namespace` and GMMC's
    `LDALayer`, reduced to a `PickledLDALayer` holding its centres. Anything
    else is an `UnsafePickleError` naming the class; `allow_unsafe_pickle`
    unpickles everything (only for files whose source you trust). `lazy`: the
    tensors of a zip-format file are mapped, not read, until used. A tensor
    declaring more data than the file holds is refused.
    """
    path = Path(path)
    require_checkpoint_file(path)
    return _load_torch(path, allow_unsafe_pickle, admitted=_OFFICIAL_GLOBALS, lazy=lazy,
                       what="tensors, plain containers, argparse.Namespace and GMMC's LDALayer",
                       pickle_module=_stand_in_pickle_module())
