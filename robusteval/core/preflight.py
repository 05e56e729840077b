"""Checks a job must pass before anything is written.

A command that is going to be rejected must be rejected before it creates its
run directory: a directory holding only a config.json looks like an
interrupted run to `report`, `check` and the next attempt. So everything that
can fail on the user's input (the output path, the data against the model,
the budgets) is checked here, up front, and fails as one clear line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from robusteval.core.errors import UsageError


class OutputNotWritable(UsageError):
    """An output path that cannot be created or written."""


class DataModelMismatch(UsageError):
    """Data that the model cannot classify: other image shapes, or labels outside its classes."""


def _nearest_existing(path: Path) -> Path:
    current = path
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def check_writable_directory(path: str | Path, what: str = "output directory", option: str = "--out") -> None:
    """Raise OutputNotWritable unless `path` is, or can be created as, a directory we may write in.

    Looks only (nothing is created): the nearest existing ancestor must be a
    writable directory, and nothing on the way may be a file. Writing can
    still fail later (a full disk); `make_directory` reports that in one line too.
    """
    _check_creatable(Path(path), Path(path), what, option)


def check_writable_file(path: str | Path, what: str = "output file", option: str = "--out") -> None:
    """Raise OutputNotWritable unless the file `path` can be written (its folder created if needed)."""
    path = Path(path)
    if path.is_dir():
        raise OutputNotWritable(f"{what} {path} is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputNotWritable(f"cannot write {what} {path}: the file is not writable by this user")
    _check_creatable(path.parent, path, what, option)


def _check_creatable(directory: Path, shown: Path, what: str, option: str) -> None:
    for part in (shown, *shown.parents):
        if part.is_symlink() and not part.exists():  # mkdir there would only say "File exists"
            raise OutputNotWritable(f"cannot write {what} {shown}: {part} is a symbolic link to {os.readlink(part)}, "
                                    f"which does not exist; remove the link or choose another {option}")
    existing = _nearest_existing(directory)
    if not existing.is_dir():
        blocker = "is a file" if existing.exists() else "does not exist"
        raise OutputNotWritable(f"cannot write {what} {shown}: {existing} {blocker}; choose another {option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        # access() also answers EROFS for read-only file systems, which permissions alone would not show.
        raise OutputNotWritable(f"cannot write {what} {shown}: {existing} is not writable by this user; "
                                f"choose another {option}")


def make_directory(path: str | Path, what: str = "output directory") -> None:
    """mkdir -p, with an OS failure (permissions, read-only or full disk) as one OutputNotWritable line."""
    check_writable_directory(path, what)
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputNotWritable(f"cannot create {what} {path}: {error.strerror or error}; choose another --out") \
            from error


def check_data_fits_model(model_name: str, input_shape: Sequence[int], num_classes: int, x: Tensor, y: Tensor,
                          data_name: str = "the data") -> None:
    """Image shape equal to the model's input_shape, and every label one of its classes.

    The class count is the model's: a data set that holds only some classes
    (labels 0-4 of the digits) is fine; a label the model does not have is not.
    """
    expected = tuple(int(d) for d in input_shape)
    got = tuple(int(d) for d in x.shape[1:])
    if got != expected:
        raise DataModelMismatch(
            f"model '{model_name}' takes images of shape {_shape(expected)} but {data_name} has images of shape "
            f"{_shape(got)}; use data of the model's size or a model built for this data")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataModelMismatch(
            f"{data_name} has labels in [{int(y.min())}, {int(y.max())}] but model '{model_name}' has "
            f"{num_classes} classes (labels 0..{num_classes - 1})")


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape))


def check_eps_budget(norm: str, eps: Sequence[float], input_shape: Sequence[int]) -> None:
    """Reject budgets beyond the whole pixel range, where every image can reach every other one.

    Any two images in [0, 1]^d differ by at most 1 in L∞, √d in L2 and d in L1,
    so a larger ε measures nothing more; it is almost always a typo (2 for 2/255).
    """
    dim = math.prod(int(d) for d in input_shape)
    limit = {"Linf": 1.0, "L1": float(dim)}.get(norm, math.sqrt(dim))
    beyond = [e for e in eps if e > limit + 1e-12]
    if beyond:
        what = {"Linf": "1 (the whole [0, 1] pixel range)",
                "L1": f"{dim} (the L1 diameter of the image box)"}.get(
            norm, f"√{dim} = {limit:.4g} (the diameter of the image box)")
        hint = f"; did you mean {beyond[0]:g}/255 = {beyond[0] / 255:.4g}?" if norm == "Linf" else ""
        raise UsageError(f"eps {', '.join(f'{e:g}' for e in beyond)} under {norm} exceeds {what}, where every "
                         f"image reaches every other{hint}")
