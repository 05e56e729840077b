"""A timm-style model registry: `register_model` and the entries it keeps.

Each entry has a model card (what callers need to know: paper, capabilities,
training recipe, shipped checkpoints), a builder that makes the architecture
for a data set, and a trainer that reproduces the shipped weights. Every zoo
module registers its models here; `robusteval.model_zoo.factory`, above them
all, builds them (`create_model`, `list_models`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robusteval.core.checkpoints import (
    CheckpointError,
    load_into,
    read_state_dict,
)
from robusteval.core.interface import CAPABILITIES, JointModel
from robusteval.core.names import resolve_name
from robusteval.data import DatasetInfo
from robusteval.model_zoo.claims import Claim
from robusteval.model_zoo.official import (
    official_spec,
)
from robusteval.training.context import TrainContext
from robusteval.training.recipes import Recipe

WEIGHTS_DIR = Path(__file__).parent / "weights"

Builder = Callable[[DatasetInfo], JointModel]
# trainer(model, train_set, context) -> figures to record in the card; context.recipe is the card's recipe
Trainer = Callable[[Any, Any, TrainContext], dict[str, float]]


@dataclass(frozen=True)
class ModelCard:
    """What a caller needs to know about a registered model."""

    name: str
    family: str  # "joint" or "baseline"
    system: str
    paper: str
    capabilities: frozenset[str]
    description: str = ""
    default_epochs: int = 30
    # The training recipe's options (e.g. the noise level of a Gaussian baseline), typed and checked.
    recipe: Recipe = field(default_factory=Recipe)
    # Where inference draws randomness; empty when it is deterministic.
    randomness: str = "none: inference is deterministic"
    # Where the zoo model departs from the official code, where that can change a robustness conclusion.
    departures: tuple[str, ...] = ()
    # The paper's own headline robustness figures (model_zoo/claims.py); empty where none could be confirmed.
    claims: tuple[Claim, ...] = ()

    def checkpoint_path(self, dataset: str) -> Path:
        return WEIGHTS_DIR / f"{self.name}-{dataset}.safetensors"

    def checkpoint_record_path(self, dataset: str) -> Path:
        return WEIGHTS_DIR / f"{self.name}-{dataset}.json"

    def checkpoints(self) -> dict[str, dict[str, Any]]:
        """Shipped checkpoints by data set: file, sha256, recipe and measured figures."""
        records = {}
        for path in sorted(WEIGHTS_DIR.glob(f"{self.name}-*.json")):
            record = json.loads(path.read_text())
            if record.get("model") == self.name:
                records[record["dataset"]] = record
        return records

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "system": self.system,
            "paper": self.paper,
            "description": self.description,
            "capabilities": sorted(self.capabilities),
            "randomness": self.randomness,
            "departures": list(self.departures),
            "recipe": self.recipe.as_dict(),
            "checkpoints": self.checkpoints(),
            "official": self.official(),
            "claims": [claim.as_dict() for claim in self.claims],
        }

    def official(self) -> dict[str, Any] | None:
        """The paper's own architecture and file format, where robusteval builds it (see model_zoo/official)."""
        spec = official_spec(self.name)
        return spec.as_dict() if spec is not None else None

    def capabilities_for(self, dataset: str) -> frozenset[str]:
        """What the model built for `dataset` from a paper's file offers (the official architecture's
        capabilities where it has one there), else the re-implementation's."""
        spec = official_spec(self.name)
        return spec.capabilities if spec is not None and dataset in spec.datasets else self.capabilities


@dataclass(frozen=True)
class ModelEntry:
    card: ModelCard
    build: Builder
    train: Trainer | None


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str,
    *,
    family: str,
    system: str,
    paper: str,
    capabilities: set[str] | frozenset[str],
    trainer: Trainer | None = None,
    description: str = "",
    default_epochs: int = 30,
    recipe: Recipe | None = None,
    randomness: str = "none: inference is deterministic",
    departures: tuple[str, ...] = (),
    claims: tuple[Claim, ...] = (),
) -> Callable[[Builder], Builder]:
    """Register a builder `build(info: DatasetInfo) -> JointModel` under `name`.

    The recipe is checked here, so a bad one fails when its module is imported.
    """
    unknown = set(capabilities) - CAPABILITIES
    if unknown:
        raise ValueError(f"unknown capabilities {sorted(unknown)} for model {name}")
    recipe = _checked_recipe(name, recipe, trainer)
    if default_epochs < 1:
        raise ValueError(f"model {name!r}: default_epochs must be at least 1, got {default_epochs}")

    def decorator(build: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        card = ModelCard(
            name=name,
            family=family,
            system=system,
            paper=paper,
            capabilities=frozenset(capabilities),
            description=description,
            default_epochs=default_epochs,
            recipe=recipe,
            randomness=randomness,
            departures=tuple(departures),
            claims=tuple(claims),
        )
        _REGISTRY[name] = ModelEntry(card, build, trainer)
        return build

    return decorator


def _checked_recipe(name: str, recipe: Recipe | None, trainer: Trainer | None) -> Recipe:
    if recipe is None:
        return Recipe()
    if not isinstance(recipe, Recipe):
        raise ValueError(
            f"model {name!r}: the recipe must be a frozen Recipe dataclass (robusteval.training.recipes), "
            f"got {type(recipe).__name__}"
        )
    if trainer is None and len(recipe) > 0:
        raise ValueError(f"model {name!r}: a recipe needs a trainer to follow it")
    try:
        # Recipes check themselves when made; checking again catches one changed by object.__setattr__.
        type(recipe).__post_init__(recipe)
    except ValueError as error:
        raise ValueError(f"model {name!r}: bad training recipe: {error}") from None
    return recipe


def registered(name: str) -> ModelEntry:
    """The entry of a model registered so far (`robusteval.model_zoo.factory` registers the whole zoo)."""
    return _REGISTRY[resolve_name(name, _REGISTRY, "model")]


def registered_names() -> list[str]:
    """The names registered so far, sorted."""
    return sorted(_REGISTRY)


def load_shipped_weights(model: JointModel, card: ModelCard, info: DatasetInfo) -> None:
    """Load the card's shipped (sha256-verified) weights for `info` into `model`."""
    records = card.checkpoints()
    if info.name not in records:
        have = ", ".join(sorted(records)) or "none"
        raise CheckpointError(
            f"model '{card.name}' has no shipped weights for data set '{info.name}' "
            f"(weights exist for: {have}). Train them with "
            f"`robusteval train --model {card.name} --dataset {info.name}`, "
            f"or pass pretrained=False for random weights."
        )
    record = records[info.name]
    path = WEIGHTS_DIR / record["file"]
    state = read_state_dict(path, expected_sha256=record["sha256"])
    load_into(model, state, str(path))
