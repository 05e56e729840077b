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

from robusteval.checkpoints import CheckpointError, load_into, read_state_dict, safetensors_metadata
from robusteval.data import DatasetInfo, dataset_info
from robusteval.errors import UsageError
from robusteval.interface import CAPABILITIES, JointModel
from robusteval.model_zoo.official import PAPER_DATASETS, OfficialArchitecture, official_architecture, official_spec
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
    # Where the zoo model departs from the official code, where that can change a robustness conclusion.
    departures: tuple[str, ...] = ()

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


def checkpoint_dataset_info(checkpoint: str | Path) -> DatasetInfo | None:
    """The data set a checkpoint was trained on, from the metadata `robusteval train` writes (None if unknown)."""
    from robusteval.data import DATASETS

    trained_on = safetensors_metadata(checkpoint).get("dataset")
    return DATASETS.get(trained_on) if trained_on else None


def create_model(
    name: str,
    dataset: str = "digits",
    pretrained: bool = True,
    device: str | torch.device = "cpu",
    checkpoint: str | Path | None = None,
    model_dir: str | Path | None = None,
    threat_model: str = "Linf",
    allow_unsafe_pickle: bool = False,
    official: bool | None = None,
    vae: str | Path | None = None,
    model_config: str | Path | dict[str, Any] | None = None,
) -> JointModel:
    """Build a registered model for `dataset`, with its shipped (verified) weights.

    `checkpoint` loads other weights for the same architecture instead. On a
    data set for which the model has an official architecture (JEM on cifar10,
    Cohen et al.'s ResNets on imagenet, ...), `checkpoint` is a file as the
    paper's code writes it, and the network is built to the file's sizes.
    `official=None` decides by the weights: a `.safetensors` file or shipped
    weights are robusteval's own re-implementation, anything else the
    official architecture; True or False forces the choice.
    On the other data sets the official code defines (jdm on mnist and
    fashion-mnist) the official architecture is used for a non-safetensors
    `checkpoint` or `official=True`, the re-implementation otherwise.
    `vae` (egc's autoencoder file) and `model_config` (a JSON file or dict of
    the official training flags, for what a file's shapes cannot tell) go to
    the official loaders that take them (see the card's `official.options`).
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
    spec = official_architecture(entry.card.name, info.name) if official is not False else None
    if official and spec is None:
        raise UsageError(f"model '{entry.card.name}' has no official architecture for data set '{info.name}'")
    if official is None and spec is not None:
        if checkpoint is not None:
            own_weights = str(checkpoint).endswith(".safetensors")
        else:  # off the papers' data sets, only a paper's file selects the official architecture
            own_weights = (pretrained and info.name in entry.card.checkpoints()) or info.name not in PAPER_DATASETS
        spec = None if own_weights else spec
    options = {k: v for k, v in (("vae", vae), ("model_config", model_config)) if v is not None}
    if spec is not None:
        model = _create_official(spec, info, pretrained, checkpoint, allow_unsafe_pickle, options)
        model.name = entry.card.name
        return model.eval().to(target)
    if options:
        flags = " and ".join(f"--{k.replace('_', '-')}" for k in options)
        verb = "apply" if len(options) > 1 else "applies"
        raise UsageError(f"{flags} {verb} to the official architectures that take them (see the model card's "
                         f"'official' options); '{entry.card.name}' on {info.name} is robusteval's re-implementation")
    if checkpoint is not None:
        # The weights, not the data, fix the input shape and the classes: digits weights make a 1×8×8,
        # 10-class model whatever data it is then given (which the jobs check against it).
        info = checkpoint_dataset_info(checkpoint) or info
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


def _create_official(
    official: OfficialArchitecture, info: DatasetInfo, pretrained: bool, checkpoint: str | Path | None,
    allow_unsafe_pickle: bool, options: dict[str, Any],
) -> JointModel:
    """The paper's architecture for `info`: from its official file, or at the published size with random weights."""
    unused = sorted(set(options) - set(official.options))
    if unused:
        flags = " and ".join(f"--{k.replace('_', '-')}" for k in unused)
        raise UsageError(f"{flags}: the official '{official.model}' loader takes no such file "
                         f"(it takes: {', '.join(official.options) or 'the checkpoint only'})")
    if checkpoint is None and options:
        raise UsageError(f"{', '.join(options)} given without checkpoint: they describe how to read the official "
                         f"'{official.model}' file (CLI: --checkpoint FILE)")
    if checkpoint is not None:
        return official.load(info, Path(checkpoint), allow_unsafe_pickle, **options)
    if pretrained:
        raise CheckpointError(
            f"model '{official.model}' on {info.name} is the official architecture of {official.repository}; "
            f"robusteval ships no weights for it (nothing is downloaded). Pass the paper's file with "
            f"checkpoint=<file> (CLI: --checkpoint), or pretrained=False for random weights."
        )
    return official.build(info)
