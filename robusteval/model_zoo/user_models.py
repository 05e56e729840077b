"""Models people bring from the command line: `--model package.module:factory` (`--model-kwargs JSON`).

The factory is any importable callable that returns a JointModel, or a plain
`nn.Module` classifier (float [0, 1] NCHW images in, logits out), which is
wrapped with `robusteval.wrap` at the data set's number of classes and image
shape. What a run evaluated is recorded as `model_source`: the reference,
the module's file and its sha256, and the keywords the factory was called
with. Every way this can go wrong (the module does not import, the name is
missing or not callable, the factory raises or returns something else, the
logits have the wrong shape) is a one-line `UsageError`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robusteval.core.errors import UsageError
from robusteval.core.interface import JointModel, wrap

# A registered name never holds ':' except RobustBench's prefix, so any other 'a.b:c' names a factory.
ROBUSTBENCH_PREFIX = "robustbench:"


def is_factory_reference(name: str) -> bool:
    """Whether a --model value is `module:callable` (and not a registered name or robustbench:<Name>)."""
    return ":" in name and not name.startswith(ROBUSTBENCH_PREFIX)


@dataclass(frozen=True)
class FactoryModel:
    """A model built by a user's factory and the record of where it came from (a run's `model_source`)."""

    model: JointModel
    source: dict[str, Any]


def parse_model_kwargs(value: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """--model-kwargs as a dict: a JSON object (text) or a mapping; None is no keywords."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        parsed: Any = dict(value)
    else:
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as error:
            raise UsageError(f"--model-kwargs: expected a JSON object such as '{{\"width\": 64}}', got {value!r} "
                             f"({error.msg})") from None
    if not isinstance(parsed, dict) or not all(isinstance(k, str) for k in parsed):
        raise UsageError(f"--model-kwargs: expected a JSON object of keyword arguments, got {value!r}")
    return parsed


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _factory(reference: str) -> tuple[Any, Any]:
    """The module and the callable `reference` names."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"--model {reference!r}: expected package.module:factory (a callable returning a model)")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any failure of the user's module is their error, reported in one line
        raise UsageError(f"--model {reference}: cannot import module '{module_name}' ({_one_line(error)}); "
                         f"is it on PYTHONPATH?") from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UsageError(f"--model {reference}: module '{module_name}' has no attribute '{attribute}'")
        target = getattr(target, part)
    if not callable(target):
        raise UsageError(f"--model {reference}: '{attribute}' is a {type(target).__name__}, not a callable")
    return module, target


def _file_record(module: Any) -> dict[str, str | None]:
    file = getattr(module, "__file__", None)
    if not file or not Path(file).is_file():
        return {"file": None, "sha256": None}
    return {"file": str(Path(file).resolve()), "sha256": hashlib.sha256(Path(file).read_bytes()).hexdigest()}


def build_factory_model(reference: str, kwargs: Mapping[str, Any], num_classes: int,
                        input_shape: tuple[int, int, int], device: torch.device) -> FactoryModel:
    """Call the factory `reference` with `kwargs`; the model in eval mode on `device`, checked on one image.

    A plain `nn.Module` is wrapped with `num_classes` and `input_shape` (the data set's); a JointModel keeps
    its own, which the jobs then check against the data.
    """
    module, factory = _factory(reference)
    try:
        built = factory(**kwargs)
    except Exception as error:  # the user's code: its failure is reported in one line, not as our traceback
        raise UsageError(f"--model {reference}: the factory raised {_one_line(error)}") from None
    if isinstance(built, JointModel):
        model = built
    elif isinstance(built, nn.Module):
        model = wrap(built, num_classes, input_shape, name=reference)
    else:
        raise UsageError(f"--model {reference}: the factory returned a {type(built).__name__}; expected a "
                         f"torch.nn.Module classifier or a robusteval JointModel")
    model = model.eval().to(device)
    if not getattr(model, "name", None) or model.name == "wrapped":
        model.name = reference
    _check_logits(model, reference)
    return FactoryModel(model, {"factory": reference, **_file_record(module), "kwargs": dict(kwargs)})


def _check_logits(model: JointModel, reference: str) -> None:
    """One forward pass on a blank image: logits of shape (1, num_classes), or a one-line error."""
    probe = torch.zeros((1, *model.input_shape), device=model.device)
    try:
        with torch.no_grad():
            logits = model.logits(probe)
    except Exception as error:  # a module that cannot take the data's images
        raise UsageError(f"--model {reference}: the model fails on a {tuple(probe.shape)} image "
                         f"({_one_line(error)})") from None
    if tuple(logits.shape) != (1, model.num_classes):
        raise UsageError(f"--model {reference}: logits of shape {tuple(logits.shape)} for one image; expected "
                         f"(1, {model.num_classes})")
