"""A timm-style model registry: `register_model`, `create_model`, `list_models`.

Each entry has a model card (what callers need to know: paper, capabilities,
training recipe, shipped checkpoints), a builder that makes the architecture
for a data set, and a trainer that reproduces the shipped weights.

The registry sits above `robusteval.training` (trainers, recipes, loops) and
below `robusteval.train_model` (the `robusteval train` command).
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from robusteval.checkpoints import CheckpointError, load_into, read_state_dict
from robusteval.data import DatasetInfo, dataset_info
from robusteval.interface import CAPABILITIES, JointModel
from robusteval.names import resolve_name
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
            "recipe": self.recipe.as_dict(),
            "checkpoints": self.checkpoints(),
        }


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


def _ensure_zoo_loaded() -> None:
    # Importing the zoo package runs every module's @register_model.
    import robusteval.model_zoo  # noqa: F401


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    _ensure_zoo_loaded()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_entry(name: str) -> ModelEntry:
    _ensure_zoo_loaded()
    return _REGISTRY[resolve_name(name, _REGISTRY, "model")]


def model_card(name: str) -> ModelCard:
    return get_entry(name).card


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when it is available, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu")
    return torch.device(device)


def create_model(
    name: str,
    dataset: str = "digits",
    pretrained: bool = True,
    device: str | torch.device = "cpu",
    checkpoint: str | Path | None = None,
    model_dir: str | Path | None = None,
    threat_model: str = "Linf",
    allow_unsafe_pickle: bool = False,
) -> JointModel:
    """Build a registered model for `dataset`, with its shipped (verified) weights.

    `checkpoint` loads other weights for the same architecture instead.
    `robustbench:<Name>` builds a RobustBench zoo architecture with weights
    from `model_dir` in RobustBench's layout; it never downloads.
    """
    target = resolve_device(device)
    if name.startswith("robustbench:"):
        from robusteval.model_zoo.robustbench_zoo import create_robustbench_model

        return create_robustbench_model(
            name.split(":", 1)[1], dataset=dataset, threat_model=threat_model, model_dir=model_dir,
            allow_unsafe_pickle=allow_unsafe_pickle,
        ).to(target)

    entry = get_entry(name)
    info = dataset_info(dataset)
    model = entry.build(info)
    model.name = entry.card.name
    if checkpoint is not None:
        state = read_state_dict(checkpoint, allow_unsafe_pickle=allow_unsafe_pickle)
        load_into(model, state, str(checkpoint))
    elif pretrained:
        records = entry.card.checkpoints()
        if info.name not in records:
            have = ", ".join(sorted(records)) or "none"
            raise CheckpointError(
                f"model '{entry.card.name}' has no shipped weights for data set '{info.name}' "
                f"(weights exist for: {have}). Train them with "
                f"`robusteval train --model {entry.card.name} --dataset {info.name}`, "
                f"or pass pretrained=False for random weights."
            )
        record = records[info.name]
        path = WEIGHTS_DIR / record["file"]
        state = read_state_dict(path, expected_sha256=record["sha256"])
        load_into(model, state, str(path))
    return model.eval().to(target)
