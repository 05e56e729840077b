"""The attack engine's progress bar: points done, the current batch, ε and component, and the robust share so far."""

from __future__ import annotations

from torch import Tensor
from tqdm.auto import tqdm


class AttackProgress:
    """A tqdm bar (disabled: it shows nothing) and the robust points counted per ε in finished batches."""

    def __init__(self, total: int, enabled: bool, n_eps: int = 1, initial: int = 0,
                 robust_done: list[int] | None = None, title: str = ""):
        self.bar = tqdm(total=total, initial=initial, unit="pt", dynamic_ncols=True, leave=False,
                        disable=not enabled)
        self.enabled = enabled
        self.seen = initial  # points of finished batches (tqdm keeps no count when disabled)
        self.robust_done = robust_done if robust_done is not None else [0] * n_eps
        self.title = title  # e.g. "shard 2/4": which part of a sharded run this bar shows

    def describe(self, where: str, eps: float, label: str) -> None:
        self.bar.set_description(f"{self.title + ' ' if self.title else ''}{where} eps={eps:g} {label}")

    def postfix(self, e: int, correct: Tensor, broken: Tensor, left: int) -> None:
        """The robust share at ε index e over the finished batches and the batch under attack."""
        if not self.enabled:
            return
        seen = self.seen + correct.shape[0]
        robust = self.robust_done[e] + int((correct & ~broken).sum())
        self.bar.set_postfix(left=left, robust=f"{robust / max(seen, 1):.1%}")

    def finished(self, points: int, robust: list[int] | None = None) -> None:
        """A batch of `points` is done; `robust` counts its robust points per ε."""
        for e, count in enumerate(robust or []):
            self.robust_done[e] += count
        self.seen += points
        self.bar.update(points)

    def close(self) -> None:
        self.bar.close()
