"""A timm-style model registry: `register_model`, `create_model`, `list_models`.

Each entry has a model card (what callers need to know: paper, capabilities,
training recipe, shipped checkpoints), a builder that makes the architecture
for a data set, and a trainer that reproduces the shipped weights.
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
from robusteval.names import resolve_name

WEIGHTS_DIR = Path(__file__).parent / "weights"

Builder = Callable[[DatasetInfo], JointModel]
# trainer(model, train_set, options) -> dict of figures to record in the card
Trainer = Callable[..., dict]


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
    # Options of the training recipe (e.g. the noise level of a Gaussian baseline).
    recipe: dict[str, Any] = field(default_factory=dict)
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
            "recipe": dict(self.recipe),
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
    recipe: dict[str, Any] | None = None,
    randomness: str = "none: inference is deterministic",
    departures: tuple[str, ...] = (),
) -> Callable[[Builder], Builder]:
    """Register a builder `build(info: DatasetInfo) -> JointModel` under `name`."""
    unknown = set(capabilities) - CAPABILITIES
    if unknown:
        raise ValueError(f"unknown capabilities {sorted(unknown)} for model {name}")

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
            recipe=dict(recipe or {}),
            randomness=randomness,
            departures=tuple(departures),
        )
        _REGISTRY[name] = ModelEntry(card, build, trainer)
        return build

    return decorator


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


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when it is available, else the CPU; others must exist here.

    cpu, cuda, cuda:N (N below the number of GPUs) and mps (where PyTorch has
    it) are accepted; anything else (tpu, meta, a cuda:7 on a machine with two
    GPUs) is a DeviceUnavailable saying what is there. A torch.device is
    taken as it is.
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
