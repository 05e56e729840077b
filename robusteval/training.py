"""Reproducing the shipped checkpoints: `robusteval train`.

Training is deterministic on the CPU: one seed drives every random draw, and
training runs single-threaded so the weights do not depend on the number of
cores (a multi-threaded reduction may sum in another order).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from robusteval.checkpoints import atomic_write_json, save_safetensors
from robusteval.data import ImageDataset, load_dataset
from robusteval.interface import JointModel
from robusteval.model_zoo import draws


@dataclass
class TrainContext:
    """What a trainer gets besides the model and the data."""

    epochs: int
    seed: int
    generator: torch.Generator
    progress: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    # Where the model trains. Every draw comes from the CPU `generator` and is moved here, so a run's
    # random stream is the same on every device (its arithmetic is not: see README, Reproduction).
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def epoch_bar(self, desc: str) -> tqdm:
        """A progress bar over epochs; trainers set its postfix to loss and accuracy."""
        return tqdm(range(self.epochs), desc=desc, disable=not self.progress, unit="epoch", leave=True)

    def randn_like(self, x: Tensor) -> Tensor:
        return draws.randn(tuple(x.shape), self.generator, x.device, x.dtype)

    def rand(self, *shape: int) -> Tensor:
        return draws.rand(shape, self.generator, self.device)

    def randint(self, high: int, n: int) -> Tensor:
        return torch.randint(0, high, (n,), generator=self.generator).to(self.device)

    def batches(self, data: ImageDataset, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """One shuffled pass over the data set, each minibatch on the training device."""
        for x, y in minibatches(data, batch_size, self.generator):
            yield x.to(self.device), y.to(self.device)


def minibatches(data: ImageDataset, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """One shuffled pass over the data set."""
    order = torch.randperm(len(data), generator=generator)
    for start in range(0, len(data), batch_size):
        index = order[start : start + batch_size]
        yield data.x[index], data.y[index]


@torch.no_grad()
def accuracy(model: JointModel, data: ImageDataset, sigma: float = 0.0, batch_size: int = 500) -> float:
    """Top-1 accuracy of logits(x, σ) on clean x (σ = 0) or on x + σ·n with a fixed noise seed."""
    model.eval()
    generator = torch.Generator().manual_seed(1234)
    correct = 0
    for start in range(0, len(data), batch_size):
        x = data.x[start : start + batch_size].to(model.device)
        y = data.y[start : start + batch_size].to(model.device)
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator).to(x.device)
        correct += int((model.logits(x, sigma).argmax(1) == y).sum())
    return correct / len(data)


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

    With `out=None` the weights go where the registry looks for shipped
    weights, so the command that trains is the command that ships. On the CPU
    training is single-threaded (one reduction order); on a GPU it runs with
    deterministic algorithms and no TF32.
    """
    from robusteval.determinism import set_deterministic
    from robusteval.model_zoo.registry import WEIGHTS_DIR, create_model, get_entry, resolve_device

    device = resolve_device(device)

    entry = get_entry(name)
    card = entry.card
    if entry.train is None:
        raise ValueError(f"model '{card.name}' has no training recipe")
    epochs = card.default_epochs if epochs is None else int(epochs)
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    recipe_options = {**card.recipe, **(options or {})}

    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    set_deterministic(True)
    torch.manual_seed(seed)
    try:
        train_set = load_dataset(dataset, split="train", root=root)
        test_set = load_dataset(dataset, split="test", root=root)
        # Built on the CPU (its initial weights come from the CPU generator), then moved.
        model = create_model(card.name, dataset=dataset, pretrained=False, device="cpu").to(device)
        context = TrainContext(epochs, seed, torch.Generator().manual_seed(seed), progress, recipe_options, device)
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
    option_flags = "".join(f" --option {k}={v}" for k, v in sorted((options or {}).items()))
    record: dict[str, Any] = {
        "model": card.name,
        "dataset": train_set.name,
        "file": weights.name,
        "sha256": "",
        "command": f"robusteval train --model {card.name} --dataset {train_set.name} "
        f"--epochs {epochs} --seed {seed}{option_flags}" + (f" --device {device.type}" if device.type != "cpu" else ""),
        "epochs": epochs,
        "seed": seed,
        "recipe": recipe_options,
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
