"""The files of an attack run beside its records: adversarial examples per batch and per ε, and a batch's state.

- `shard_batch<b>.pt`: a finished batch's adversarial examples (one tensor per ε), until the run merges them;
- `adversarial_eps<ε>.pt`: all N points at one ε (the clean image where not broken), RobustBench's format;
- `partial_batch<b>.pt`: a `BatchState` saved after each ε of a batch, so a killed run loses at most one ε.

All are written atomically and load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from robusteval.core.atomic_files import atomic_write_bytes
from robusteval.core.errors import UsageError
from robusteval.runs import RunDirectory

logger = logging.getLogger(__name__)


def adversarial_file_name(eps: float) -> str:
    """`adversarial_eps<ε>.pt`: all N points (the clean image where not broken), RobustBench's external format."""
    return f"adversarial_eps{eps:.6g}.pt"


def shard_name(batch: int) -> str:
    return f"shard_batch{batch:05d}.pt"


def partial_name(batch: int) -> str:
    return f"partial_batch{batch:05d}.pt"


def save_atomically(path: Path, obj: Any) -> None:
    """torch.save `obj` (tensors, plain lists, dicts and strings: loadable with weights_only=True) atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_tensors(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_shard(run_dir: RunDirectory, batch: int, start: int, stop: int, eps: list[float]) -> list[Tensor]:
    """A finished batch's adversarial examples per ε: from its shard, or cut from the merged files."""
    shard = run_dir.artifact(shard_name(batch))
    if shard.exists():
        tensors = load_tensors(shard)
        return [tensors[e] for e in range(len(eps))]
    merged = [run_dir.artifact(adversarial_file_name(value)) for value in eps]
    if all(p.exists() for p in merged):
        return [load_tensors(p)[start:stop] for p in merged]
    raise UsageError(f"{run_dir.path} records batch {batch} as complete but its adversarial examples are missing; "
                     f"re-run with --no-resume")


@dataclass
class BatchState:
    """Where one batch stands after its last finished ε (tensors on the device while it is attacked)."""

    clean_prediction: Tensor  # (B,) deployed decision on the clean points
    masked: dict[str, list[bool]]  # per gradient variant, which points have masked gradients
    adv: Tensor  # the current adversarial examples (the clean point where unbroken)
    broken: Tensor  # (B,) bool
    final_prediction: Tensor  # (B,) the decision on `adv`
    broken_by: list[str | None]  # the component that broke each point
    per_eps: list[list[dict[str, Any]]]  # per point, its EpsOutcome records so far
    adversarial: list[Tensor]  # per finished ε, the batch's examples on the CPU
    notes: list[str]
    seconds: float  # time spent on the batch by earlier, killed calls
    # Per point, broken by the attack's own components (not only by a remedy or escalation stage); None in
    # states saved before those stages existed (then it equals `broken`).
    standard: Tensor | None = None
    # Per gradient variant, per point: "saturation", "no-gradient" or None (see sanity.gradient_masked).
    causes: dict[str, list[str | None]] | None = None

    @property
    def finished_eps(self) -> int:
        return len(self.adversarial)

    def to(self, device: torch.device) -> BatchState:
        """A copy with its working tensors on `device` (copies: they change in place, and a loaded `adv` shares
        storage with the last ε's examples)."""
        standard = self.broken if self.standard is None else self.standard
        return BatchState(self.clean_prediction.to(device, copy=True), self.masked, self.adv.to(device, copy=True),
                          self.broken.to(device, copy=True), self.final_prediction.to(device, copy=True),
                          self.broken_by, self.per_eps, self.adversarial, self.notes, self.seconds,
                          standard.to(device, copy=True), self.causes or {})

    def save(self, path: Path, seconds: float) -> None:
        """Write the state after a finished ε (the working tensors as their CPU values)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(clean_prediction=self.clean_prediction.cpu(), adv=self.adversarial[-1],
                      broken=self.broken.cpu(), final_prediction=self.final_prediction.cpu(),
                      notes=sorted(self.notes), seconds=seconds,
                      standard=None if self.standard is None else self.standard.cpu())
        save_atomically(path, values)

    @classmethod
    def load(cls, path: Path, size: int, n_eps: int) -> BatchState | None:
        """A batch's saved state, or None (start the batch afresh) when there is none or it does not fit."""
        if not path.exists():
            return None
        try:
            state = cls(**load_tensors(path))
            fits = state.adv.shape[0] == size and len(state.per_eps) == size and 0 < state.finished_eps < n_eps
        except Exception as error:  # an unreadable file only costs the work it held
            logger.warning("ignoring %s (%s); the batch starts afresh", path, error)
            return None
        if not fits:
            logger.warning("ignoring %s: it does not match this batch; the batch starts afresh", path)
            return None
        return state
