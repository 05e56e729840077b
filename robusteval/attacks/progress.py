"""The attack engine's progress bar: points done, the current batch, ε and component, and the robust share so far.

The bar counts points; within a batch it moves as the work of each ε, and of each attack component at that ε,
finishes (`advance`), so a run of one large batch does not sit at 0% until its end.
"""

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
        self.position = initial  # where the bar stands: `seen` plus the finished share of the batch under attack
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

    def advance(self, points: int, share: float) -> None:
        """`share` (0 to 1) of the work on the batch of `points` under attack is done; the bar never moves back."""
        self._move_to(self.seen + int(points * min(max(share, 0.0), 1.0)))

    def finished(self, points: int, robust: list[int] | None = None) -> None:
        """A batch of `points` is done; `robust` counts its robust points per ε."""
        for e, count in enumerate(robust or []):
            self.robust_done[e] += count
        self.seen += points
        self._move_to(self.seen)

    def _move_to(self, position: int) -> None:
        if position > self.position:
            self.bar.update(position - self.position)
            self.position = position

    def close(self) -> None:
        self.bar.close()
