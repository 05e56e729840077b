"""The batched sampler of sequential certification: a pack of images at different looks, passes kept full.

Every image first draws its n0 selection draws, then estimation draws in
rounds up to each look of its `SequentialTest`. A forward pass is filled with
the outstanding draws of the images in the pack, in the order they joined;
when they leave room, the next images join. After a pass, the images whose
round is complete are read back (one small device-to-host copy), the test
decides, and the images that stopped leave the pack. Results are handed on
in image order, so a run directory stays a prefix of the data set.

Noise is addressed as in the CERTIFY sampler: selection draw j of image i is
draw j of stream SELECTION, estimation draw j is draw j of stream ESTIMATION
with the blocks of an n_max-draw phase, so the estimation draws up to n are
exactly those CERTIFY with n = n_max uses, and the counts, the decisions
and hence the records do not depend on the batch size or on which images
share a pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from robusteval.smoothing.sampler import (
    ESTIMATION, SELECTION, BaseClassifierRunner, NoiseSource, Phase, PredictionOutOfRange, RangeCheck,
)
from robusteval.smoothing.sequential import SequentialOutcome, SequentialTest

# The count table has one row per image in the pack; keep it at most this many entries.
MAX_COUNT_ENTRIES = 1 << 24


@dataclass(frozen=True)
class SequentialImage:
    """What the sampler found for one image: ĉ from the selection counts, the test's outcome, its share of time."""

    position: int  # index into the `images` passed to the sampler
    selection_counts: np.ndarray
    top_class: int
    outcome: SequentialOutcome
    seconds: float


def count_sequentially(
    classify: BaseClassifierRunner,
    images: Tensor,
    indices: Sequence[int],
    sigma: float,
    n0: int,
    test: SequentialTest,
    num_classes: int,
    noise: NoiseSource,
    batch_size: int,
    on_image: Callable[[SequentialImage], None],
) -> int:
    """Run sequential certification on every image; call on_image in image order. Returns the passes run.

    images: (N, C, H, W) clean inputs; indices: their data-set indices (which
    address their noise). Call inside torch.inference_mode() or torch.no_grad().
    """
    count = int(images.shape[0])
    if len(indices) != count:
        raise ValueError(f"need one data-set index per image, got {len(indices)} for {count} images")
    if n0 < 1:
        raise ValueError(f"n0 must be at least 1 selection draw, got {n0}")
    if count == 0:
        return 0
    pack = _Pack(images, indices, sigma, n0, test, num_classes, noise, batch_size)
    while pack.emitted < count:
        segments = pack.lay_out()
        started = time.perf_counter()
        slot_rows = pack.fill(segments)
        pack.classify(classify, slot_rows)
        pack.decide([image for image, _ in segments if pack.drawn[image] == pack.round_end[image]])
        # The pass's time, shared by rows.
        elapsed = time.perf_counter() - started
        for image, rows in segments:
            pack.seconds[image] += elapsed * rows / batch_size
        pack.emit(on_image)
    return pack.passes


class _Pack:
    """The images being certified, their per-image progress, and the device buffers of one pass."""

    def __init__(self, images: Tensor, indices: Sequence[int], sigma: float, n0: int, test: SequentialTest,
                 num_classes: int, noise: NoiseSource, batch_size: int):
        count = int(images.shape[0])
        self.images, self.indices, self.sigma, self.n0, self.test = images, indices, sigma, n0, test
        self.num_classes, self.noise, self.batch_size, self.count = num_classes, noise, batch_size, count
        self.device = noise.device
        self.selection_phase, self.estimation_phase = Phase(SELECTION, n0), Phase(ESTIMATION, test.n_max)
        self.slots = max(1, min(count, batch_size, MAX_COUNT_ENTRIES // num_classes))
        counts = torch.zeros((self.slots + 1) * num_classes, dtype=torch.int64, device=self.device)  # last: padding
        self.counts, self.table = counts, counts.view(self.slots + 1, num_classes)
        self.ones = torch.ones(batch_size, dtype=torch.int64, device=self.device)
        self.range_check = RangeCheck(num_classes, self.device)
        self.buffer = torch.zeros((batch_size, *images.shape[1:]), dtype=noise.dtype, device=self.device)
        self.state = test.start(count)
        self.selection = np.zeros((count, num_classes), dtype=np.int64)
        self.top = np.full(count, -1, dtype=np.int64)
        self.selecting = np.zeros(count, dtype=bool)
        self.drawn = np.zeros(count, dtype=np.int64)  # draws so far in the image's current stream
        self.round_end = np.zeros(count, dtype=np.int64)  # its draws at the end of the current round
        self.slot_of = np.full(count, -1, dtype=np.int64)
        self.seconds = np.zeros(count)
        self.free_slots = list(range(self.slots - 1, -1, -1))
        self.members: list[int] = []  # images in the pack, in the order they joined
        self.joined = 0
        self.finished: dict[int, SequentialImage] = {}
        self.emitted = 0
        self.passes = 0

    def lay_out(self) -> list[tuple[int, int]]:
        """The (image, rows) segments of the next pass: outstanding draws of the pack, then newcomers."""
        segments: list[tuple[int, int]] = []
        room = self.batch_size
        for image in self.members:
            rows = min(int(self.round_end[image] - self.drawn[image]), room)
            segments.append((image, rows))
            room -= rows
            if room == 0:
                return segments
        while room > 0 and self.joined < self.count and self.free_slots:
            image = self.joined
            self.joined += 1
            self.members.append(image)
            self.slot_of[image] = self.free_slots.pop()
            self.selecting[image], self.drawn[image], self.round_end[image] = True, 0, self.n0
            rows = min(self.n0, room)
            segments.append((image, rows))
            room -= rows
        return segments

    def fill(self, segments: list[tuple[int, int]]) -> np.ndarray:
        """Write the pass's noisy inputs into the buffer; returns the count-table row of every buffer row."""
        row = 0
        slot_rows = np.full(self.batch_size, self.slots, dtype=np.int64)
        for image, rows in segments:
            phase = self.selection_phase if self.selecting[image] else self.estimation_phase
            drawn = int(self.drawn[image])
            self.noise.write(self.buffer[row : row + rows], self.indices[image], phase, drawn, drawn + rows)
            clean = self.images[image].to(device=self.device, dtype=self.noise.dtype, non_blocking=True)
            self.buffer[row : row + rows].mul_(self.sigma).add_(clean)
            slot_rows[row : row + rows] = self.slot_of[image]
            self.drawn[image] += rows
            row += rows
        if row < self.batch_size:
            self.buffer[row:].zero_()  # padding: a valid input whose predictions are not counted
        return slot_rows

    def classify(self, classify: BaseClassifierRunner, slot_rows: np.ndarray) -> None:
        """Run the base classifier on the buffer and add its predictions to the count table."""
        members = self.members
        # The passes left if every image still used its whole budget: an upper bound for the compile decision.
        budget_left = (int((self.round_end[members] - self.drawn[members]).sum())
                       + (self.count - self.joined) * (self.n0 + self.test.n_max))
        predictions = classify(self.buffer, -(-budget_left // self.batch_size))
        if self.passes == 0 and (predictions.shape != (self.batch_size,)
                                 or int(predictions.max()) >= self.num_classes):
            raise PredictionOutOfRange(f"the base classifier must return {self.batch_size} class indices below "
                             f"{self.num_classes}, got shape {tuple(predictions.shape)} with maximum "
                             f"{int(predictions.max())}")
        row_start = torch.from_numpy(slot_rows).to(self.device) * self.num_classes
        flat = self.range_check.route(row_start, predictions, self.slots * self.num_classes)  # padding row
        self.counts.scatter_add_(0, flat, self.ones)
        self.passes += 1

    def decide(self, complete: list[int]) -> None:
        """Images whose round is complete: read their counts back, decide, and let the stopped ones leave."""
        if not complete:
            return
        self.range_check.check()  # every pass so far, before any count is read
        rows_back = torch.as_tensor(self.slot_of[complete], device=self.device)
        round_counts = self.table[rows_back].cpu().numpy()
        self.table[rows_back] = 0
        observed, successes = [], []
        for image, image_counts in zip(complete, round_counts):
            if self.selecting[image]:
                self.selection[image] = image_counts
                self.top[image] = int(np.argmax(image_counts))  # the lowest class index on ties, as CERTIFY
                self.selecting[image], self.drawn[image] = False, 0
                self.round_end[image] = self.test.looks[0]
            else:
                observed.append(image)
                successes.append(int(self.state.successes[image]) + int(image_counts[self.top[image]]))
        if observed:
            self.test.observe(self.state, np.array(observed), np.array(successes))
            for image in observed:
                self._after_look(image)

    def _after_look(self, image: int) -> None:
        if self.state.done[image]:
            self.members.remove(image)
            self.free_slots.append(int(self.slot_of[image]))
            self.finished[image] = SequentialImage(image, self.selection[image], int(self.top[image]),
                                                   self.test.outcome(self.state, image), 0.0)
        else:
            self.round_end[image] = self.test.looks[self.state.looks_done[image]]

    def emit(self, on_image: Callable[[SequentialImage], None]) -> None:
        """Hand on the finished images that come next in image order, with their share of the wall time."""
        while self.emitted in self.finished:
            result = self.finished.pop(self.emitted)
            on_image(SequentialImage(result.position, result.selection_counts, result.top_class, result.outcome,
                                     float(self.seconds[self.emitted])))
            self.emitted += 1
