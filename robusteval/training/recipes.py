"""Training recipes: frozen, typed dataclasses, checked when they are made.

A model registers with its recipe (`register_model(..., recipe=...)`), so a bad
value fails at import, naming the model and the option, instead of hours into
a training run. `robusteval train --option k=v` overrides go through
`with_options`, which checks them the same way.

A recipe is also a read-only mapping of its options (JSON values: tuples read
as lists), which is what model cards, records and reports show.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from robusteval.core.errors import UsageError
from robusteval.training.sgld import SGLDConfig

R = TypeVar("R", bound="Recipe")


@dataclass(frozen=True)
class Recipe(Mapping[str, Any]):
    """The options of a training recipe; this base has none (e.g. the `standard` baseline).

    Subclasses declare typed fields with defaults and extend `check()`.
    """

    def __post_init__(self) -> None:
        self._coerce_types()
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the first bad option; subclasses call super().check() first."""

    # --- helpers for check() ---------------------------------------------------------------
    def _fail(self, name: str, requirement: str) -> None:
        raise UsageError(f"{type(self).__name__}: {name} must be {requirement}, got {getattr(self, name)!r}")

    def _require_positive(self, *names: str) -> None:
        for name in names:
            if not getattr(self, name) > 0:
                self._fail(name, "> 0")

    def _require_non_negative(self, *names: str) -> None:
        for name in names:
            if not getattr(self, name) >= 0:
                self._fail(name, ">= 0")

    def _require_fraction(self, *names: str) -> None:
        for name in names:
            if not 0.0 <= getattr(self, name) <= 1.0:
                self._fail(name, "in [0, 1]")

    def _coerce_types(self) -> None:
        """Check each field against its annotation; ints become floats where a float is declared."""
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = _coerce(getattr(self, field.name), hints[field.name], f"{type(self).__name__}: {field.name}")
            object.__setattr__(self, field.name, value)

    # --- overrides and views ---------------------------------------------------------------
    def with_options(self: R, options: Mapping[str, Any]) -> R:
        """A copy with some options replaced, checked like the original (unknown names are errors)."""
        known = self.option_names()
        unknown = sorted(set(options) - set(known))
        if unknown:
            have = ", ".join(known) or "none"
            raise UsageError(f"unknown recipe option(s) {', '.join(unknown)} for {type(self).__name__} (options: {have})")
        return dataclasses.replace(self, **options)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls))

    def as_dict(self) -> dict[str, Any]:
        """The options as JSON values, in declaration order."""
        return {name: self[name] for name in self.option_names()}

    def __getitem__(self, name: str) -> Any:
        if name not in self.option_names():
            raise KeyError(name)
        value = getattr(self, name)
        return list(value) if isinstance(value, tuple) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self.option_names())

    def __len__(self) -> int:
        return len(self.option_names())


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is tuple:
        (element, _ellipsis) = typing.get_args(annotation)
        if not isinstance(value, (tuple, list)):
            raise UsageError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(item, element, f"{where}[]") for item in value)
    # bool is an int to Python; no recipe option means True by 1.
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is str and isinstance(value, str):
        return value
    raise UsageError(f"{where} must be {getattr(annotation, '__name__', annotation)}, got {value!r}")


@dataclass(frozen=True)
class DiffusionRecipe(Recipe):
    """The diffusion-style loop (cdn, egc, jdm): Adam, cosine LR over the epochs, EMA of the weights.

    Each batch's loss is the model's denoising term + ce_weight · its cross-entropy.
    """

    batch_size: int = 64
    lr: float = 2e-3
    ema_decay: float = 0.995
    ce_weight: float = 0.1

    def check(self) -> None:
        super().check()
        self._require_positive("batch_size", "lr")
        self._require_non_negative("ce_weight")
        if not 0.0 <= self.ema_decay < 1.0:
            self._fail("ema_decay", "in [0, 1)")


@dataclass(frozen=True)
class SGLDRecipe(Recipe):
    """The SGLD-style loop (jem, gmmc): PCD with class-conditional SGLD chains from a replay buffer.

    Adam with linear warm-up then cosine decay per step; training images carry
    Gaussian noise `data_noise`; `energy_reg` weighs an L2 penalty on the
    energies of data and samples (Du & Mordatch 2019).
    """

    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 200
    sgld_steps: int = 20
    sgld_step_size: float = 0.25
    sgld_noise: float = 0.005
    buffer_size: int = 1000
    reinit: float = 0.05
    data_noise: float = 0.015
    energy_reg: float = 0.01

    def check(self) -> None:
        super().check()
        self._require_positive("batch_size", "lr", "buffer_size")
        self._require_non_negative("warmup_steps", "data_noise", "energy_reg")
        self._require_fraction("reinit")
        try:
            self.chain
        except ValueError as error:  # SGLDConfig checks the chain's own options
            raise UsageError(f"{type(self).__name__}: {error}") from None

    @property
    def chain(self) -> SGLDConfig:
        """The training chains: steps, step size and noise scale."""
        return SGLDConfig(self.sgld_steps, self.sgld_step_size, self.sgld_noise)
