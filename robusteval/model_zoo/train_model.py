"""Reproducing the shipped checkpoints: `robusteval train`.

This sits above the model zoo (it looks models up in the registry); the
helpers every trainer uses sit below it, in `robusteval.training`.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from robusteval.core.atomic_files import atomic_write_json
from robusteval.core.checkpoints import save_safetensors
from robusteval.core.determinism import set_deterministic
from robusteval.core.devices import resolve_device
from robusteval.core.errors import UsageError
from robusteval.core.interface import JointModel
from robusteval.data import load_dataset
from robusteval.model_zoo.factory import create_model, get_entry
from robusteval.model_zoo.registry import WEIGHTS_DIR
from robusteval.training import TrainContext, accuracy

# How far a retraining elsewhere may land from a record's test accuracy (10 of the 500 digits test images);
# on the machine class that made the record it lands on the same bytes.
REPRODUCTION_TOLERANCE = 0.02


def cpu_model() -> str:
    """The CPU's model name (Linux), else what the platform module reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class TrainResult:
    model: JointModel
    weights: Path
    record: dict[str, Any]


def train_model(
    name: str,
    dataset: str = "digits",
    epochs: int | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool = True,
    options: dict[str, Any] | None = None,
    root: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> TrainResult:
    """Train a registered model with its recipe and write safetensors plus its card record.

    `options` override recipe options by name (checked like the recipe). With
    `out=None` the weights go where the registry looks for shipped weights, so
    the command that trains is the command that ships. On the CPU training is
    single-threaded (one reduction order); on a GPU it runs with deterministic
    algorithms and no TF32.
    """
    device = resolve_device(device)
    entry = get_entry(name)
    card = entry.card
    if entry.train is None:
        raise UsageError(f"model '{card.name}' has no training recipe")
    epochs = card.default_epochs if epochs is None else int(epochs)
    if epochs < 1:
        raise UsageError(f"epochs must be at least 1, got {epochs}")
    recipe = card.recipe.with_options(options or {})

    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    set_deterministic(True)
    torch.manual_seed(seed)
    try:
        train_set = load_dataset(dataset, split="train", root=root)
        test_set = load_dataset(dataset, split="test", root=root)
        # robusteval's own re-implementation, also on the data sets of the papers' official architectures.
        # Built on the CPU (its initial weights come from the CPU generator), then moved.
        model = create_model(card.name, dataset=dataset, pretrained=False, device="cpu", official=False).to(device)
        context = TrainContext(epochs, seed, torch.Generator().manual_seed(seed), progress, recipe, device)
        started = time.perf_counter()
        model.train()
        figures = entry.train(model, train_set, context) or {}
        seconds = time.perf_counter() - started
        model.eval()
        figures = {"test_accuracy": accuracy(model, test_set), **figures}
    finally:
        torch.set_num_threads(threads)
        set_deterministic(False)

    weights = Path(out) if out is not None else WEIGHTS_DIR / f"{card.name}-{train_set.name}.safetensors"
    if weights.suffix != ".safetensors":
        weights = weights.with_suffix(".safetensors")
    option_flags = "".join(f" --option {k}={_option_text(v)}" for k, v in sorted((options or {}).items()))
    record: dict[str, Any] = {
        "model": card.name,
        "dataset": train_set.name,
        "file": weights.name,
        "sha256": "",
        "command": f"robusteval train --model {card.name} --dataset {train_set.name} "
        f"--epochs {epochs} --seed {seed}{option_flags}" + (f" --device {device.type}" if device.type != "cpu" else ""),
        "epochs": epochs,
        "seed": seed,
        "recipe": recipe.as_dict(),
        "train_seconds": round(seconds, 1),
        "train_threads": 1 if device.type == "cpu" else None,
        "train_device": "cpu" if device.type == "cpu" else f"{device.type}: {torch.cuda.get_device_name(device)}",
        "torch": torch.__version__,
        "machine": platform.machine(),
        # What decides the bits of CPU training: the vector kernels PyTorch (and oneDNN) pick for this CPU.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu_model(),
        "metrics": {k: round(float(v), 4) for k, v in figures.items()},
    }
    model = model.to("cpu")
    record["sha256"] = save_safetensors(model, weights, metadata={"model": card.name, "dataset": train_set.name})
    atomic_write_json(weights.with_suffix(".json"), record)
    return TrainResult(model, weights, record)


def _option_text(value: Any) -> str:
    """How `--option` spells a value so that the recorded command parses back to it (no spaces in lists)."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
