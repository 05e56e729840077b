"""What generative joint models make: sample grids and counterfactual explanations, judged by a baseline.

`sample` draws from a model with the `sample` capability; `counterfactual`
changes test images towards a target class with a model that computes
counterfactuals (jdm). Both write a PNG grid and judge the result with the
`standard` baseline classifier. They resolve model, weights and data like
every evaluation (`robusteval.jobs.JobOptions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from robusteval.core.checkpoints import CheckpointError
from robusteval.core.errors import UsageError
from robusteval.core.interface import CapabilityError, JointModel
from robusteval.generative.quality import sample_confidence
from robusteval.jobs import JobOptions, resolve, shows_keywords
from robusteval.model_zoo.factory import create_model
from robusteval.reports.image_grids import save_counterfactual_grid, save_sample_grid

COLUMNS = 10


@dataclass
class SampleResult:
    """Samples drawn and written as a grid; the baseline's mean confidence in their classes when it exists."""

    path: Path
    model: str
    samples: Tensor
    labels: Tensor | None  # None: unconditional
    standard_confidence: float | None

    @property
    def kind(self) -> str:
        return "unconditional" if self.labels is None else "class-conditional"


def _sample_labels(n: int, num_classes: int, class_index: int | None,
                   conditional: bool) -> tuple[Tensor | None, list[str] | None]:
    if class_index is not None and not conditional:
        raise UsageError("--class asks for class-conditional samples; it cannot be combined with --unconditional")
    if class_index is not None and not 0 <= class_index < num_classes:
        raise UsageError(f"--class must be a class index in [0, {num_classes}), got {class_index}")
    rows = -(-n // COLUMNS)
    if class_index is not None:
        return torch.full((n,), class_index, dtype=torch.long), [f"class {class_index}"] * rows
    if conditional:
        return (torch.arange(n) // COLUMNS) % num_classes, [f"class {r % num_classes}" for r in range(rows)]
    return None, None


@shows_keywords(without=("shard",))
def sample(model: JointModel | str, dataset: Any = "digits", *, n: int = 100, class_index: int | None = None,
           conditional: bool = True, seed: int = 0, out: str | Path = "samples.png", **options: Any) -> SampleResult:
    """Draw `n` samples (class-conditional rows, one class, or unconditional) and write them as a PNG grid.

    `dataset` names the data set the model was trained on; `options` are the
    `robusteval.jobs.JobOptions` of every evaluation.
    """
    resolved = resolve(model, JobOptions.of(dataset, options), load_data=False)
    joint = resolved.model
    if "sample" not in joint.capabilities:
        raise CapabilityError(joint.name, "sample", joint.capabilities)
    labels, row_labels = _sample_labels(n, joint.num_classes, class_index, conditional)
    generator = torch.Generator().manual_seed(seed)
    samples = joint.sample(n, None if labels is None else labels.to(joint.device), generator=generator).cpu()
    result = SampleResult(Path(out), joint.name, samples, labels, None)
    save_sample_grid(samples, out, columns=COLUMNS, row_labels=row_labels,
                     title=f"{joint.name}: {n} {result.kind} samples (seed {seed})")
    try:
        standard = create_model("standard", dataset=resolved.dataset_name, device="cpu")
    except CheckpointError:
        return result  # no baseline weights for this data set: nothing to judge the samples with
    result.standard_confidence = sample_confidence(standard, samples, labels)
    return result


@dataclass
class CounterfactualResult:
    """Test images, their counterfactuals and targets, and how the judge (`standard`, else the model) reads both."""

    path: Path
    model: str
    originals: Tensor
    counterfactuals: Tensor
    labels: Tensor
    targets: Tensor
    flipped: Tensor  # the judge predicts the target on the counterfactual
    distance: Tensor  # L2 norm of each change
    judge: str = "standard"  # who read them: the standard baseline, or the model itself where it has no weights


@shows_keywords(without=("shard",))
def counterfactual(model: JointModel | str = "jdm", dataset: Any = "digits", *, n: int = 10,
                   target: int | None = None, t_start: float | None = None, guidance: float | None = None,
                   seed: int = 0, out: str | Path = "counterfactuals.png", **options: Any) -> CounterfactualResult:
    """Change `n` random test images to be classified as `target` (default: a random other class per image).

    Writes originals above their counterfactuals, each captioned with the
    judge's prediction: the `standard` baseline where it has shipped weights
    for the data set, else the model's own classifier (then not an independent
    judge; captions `self:`). `options` are the `robusteval.jobs.JobOptions` of
    every evaluation.
    """
    resolved = resolve(model, JobOptions.of(dataset, options))
    joint, data = resolved.model, resolved.data
    if not callable(getattr(joint, "counterfactual", None)):
        raise CapabilityError(joint.name, "counterfactual", joint.capabilities)
    if target is not None and not 0 <= target < joint.num_classes:
        raise UsageError(f"--target must be a class index in [0, {joint.num_classes}), got {target}")
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data), generator=generator)[: min(n, len(data))]
    x, y = data.x[index], data.y[index]
    if target is None:
        targets = (y + torch.randint(1, joint.num_classes, y.shape, generator=generator)) % joint.num_classes
    else:
        targets = torch.full_like(y, target)
    settings = {k: v for k, v in (("t_start", t_start), ("guidance_scale", guidance)) if v is not None}
    changed = joint.counterfactual(x.to(joint.device), targets.to(joint.device), generator=generator,
                                   **settings).cpu()
    try:
        judge, judge_name, tag = create_model("standard", dataset=resolved.dataset_name, device="cpu"), "standard", "std"
    except CheckpointError:  # no baseline weights for this data set (e.g. cifar10): the model judges itself
        judge, judge_name, tag = joint, f"{joint.name} itself (no standard weights for {resolved.dataset_name})", "self"
    with torch.no_grad():
        before = judge.logits(x.to(judge.device)).softmax(1).cpu()
        after = judge.logits(changed.to(judge.device)).softmax(1).cpu()
    save_counterfactual_grid(
        x, changed,
        [f"y={int(a)} {tag}:{int(p.argmax())} ({float(p.max()):.2f})" for a, p in zip(y, before)],
        [f"→{int(t)} {tag}:{int(p.argmax())} ({float(p.max()):.2f})" for t, p in zip(targets, after)],
        out, title=f"{joint.name} counterfactuals (seed {seed}); {tag} = the prediction of {judge_name}",
    )
    return CounterfactualResult(Path(out), joint.name, x, changed, y, targets, after.argmax(1) == targets,
                                (changed - x).flatten(1).norm(dim=1), judge_name)
