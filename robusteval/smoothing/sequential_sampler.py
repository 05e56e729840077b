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
    ESTIMATION,
    SELECTION,
    BaseClassifierRunner,
    NoiseSource,
    Phase,
    PredictionOutOfRange,
    RangeCheck,
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
    progress, queue = pack.progress, pack.queue
    while queue.emitted < count:
        segments = pack.lay_out()
        started = time.perf_counter()
        slot_rows = pack.fill(segments)
        pack.classify(classify, slot_rows)
        pack.decide([image for image, _ in segments if progress.drawn[image] == progress.round_end[image]])
        # The pass's time, shared by rows.
        elapsed = time.perf_counter() - started
        for image, rows in segments:
            progress.seconds[image] += elapsed * rows / batch_size
        pack.emit(on_image)
    return pack.passes


class _PassCounts:
    """The device side of the passes: the noisy-input buffer and the count table (one row per slot, the last row
    for padding and out-of-range predictions)."""

    def __init__(self, image_shape: tuple[int, ...], slots: int, num_classes: int, batch_size: int,
                 noise: NoiseSource):
        self.device, self.slots, self.num_classes = noise.device, slots, num_classes
        counts = torch.zeros((slots + 1) * num_classes, dtype=torch.int64, device=self.device)
        self.counts, self.table = counts, counts.view(slots + 1, num_classes)
        self.ones = torch.ones(batch_size, dtype=torch.int64, device=self.device)
        self.buffer = torch.zeros((batch_size, *image_shape), dtype=noise.dtype, device=self.device)
        self.range_check = RangeCheck(num_classes, self.device)

    def add(self, predictions: Tensor, slot_rows: np.ndarray) -> None:
        """Count each buffer row's prediction in its slot's row."""
        row_start = torch.from_numpy(slot_rows).to(self.device) * self.num_classes
        flat = self.range_check.route(row_start, predictions, self.slots * self.num_classes)  # padding row
        self.counts.scatter_add_(0, flat, self.ones)

    def take(self, slots: np.ndarray) -> np.ndarray:
        """The counts of these slots (one device-to-host copy), which are then cleared."""
        self.range_check.check()  # every pass so far, before any count is read
        rows_back = torch.as_tensor(slots, device=self.device)
        counts = self.table[rows_back].cpu().numpy()
        self.table[rows_back] = 0
        return counts


class _Progress:
    """Per-image progress: the test's state, the selection counts and ĉ, and where each image's current round of
    draws stands."""

    def __init__(self, count: int, num_classes: int, test: SequentialTest):
        self.state = test.start(count)
        self.selection = np.zeros((count, num_classes), dtype=np.int64)
        self.top = np.full(count, -1, dtype=np.int64)
        self.selecting = np.zeros(count, dtype=bool)
        self.drawn = np.zeros(count, dtype=np.int64)  # draws so far in the image's current stream
        self.round_end = np.zeros(count, dtype=np.int64)  # its draws at the end of the current round
        self.seconds = np.zeros(count)


class _Queue:
    """Which images are in the pack (in the order they joined) and in which count-table slot, which come next, and
    the finished ones waiting to be handed on in image order."""

    def __init__(self, count: int, slots: int):
        self.count = count
        self.slot_of = np.full(count, -1, dtype=np.int64)
        self.free_slots = list(range(slots - 1, -1, -1))
        self.members: list[int] = []
        self.joined = 0
        self.finished: dict[int, SequentialImage] = {}
        self.emitted = 0

    def join(self) -> int | None:
        """The next image, given a slot; None when every image joined or no slot is free."""
        if self.joined >= self.count or not self.free_slots:
            return None
        image = self.joined
        self.joined += 1
        self.members.append(image)
        self.slot_of[image] = self.free_slots.pop()
        return image

    def leave(self, image: int, result: SequentialImage) -> None:
        self.members.remove(image)
        self.free_slots.append(int(self.slot_of[image]))
        self.finished[image] = result


class _Pack:
    """The images being certified: one pass at a time laid out, filled, classified and decided (its state is in
    `passes` (device), `progress` (per image) and `queue` (membership))."""

    def __init__(self, images: Tensor, indices: Sequence[int], sigma: float, n0: int, test: SequentialTest,
                 num_classes: int, noise: NoiseSource, batch_size: int):
        count = int(images.shape[0])
        self.images, self.indices, self.sigma, self.n0, self.test = images, indices, sigma, n0, test
        self.num_classes, self.noise, self.batch_size, self.count = num_classes, noise, batch_size, count
        self.selection_phase, self.estimation_phase = Phase(SELECTION, n0), Phase(ESTIMATION, test.n_max)
        slots = max(1, min(count, batch_size, MAX_COUNT_ENTRIES // num_classes))
        self.counting = _PassCounts(tuple(images.shape[1:]), slots, num_classes, batch_size, noise)
        self.progress = _Progress(count, num_classes, test)
        self.queue = _Queue(count, slots)
        self.passes = 0

    def lay_out(self) -> list[tuple[int, int]]:
        """The (image, rows) segments of the next pass: outstanding draws of the pack, then newcomers."""
        progress, queue = self.progress, self.queue
        segments: list[tuple[int, int]] = []
        room = self.batch_size
        for image in queue.members:
            rows = min(int(progress.round_end[image] - progress.drawn[image]), room)
            segments.append((image, rows))
            room -= rows
            if room == 0:
                return segments
        while room > 0 and (image := queue.join()) is not None:
            progress.selecting[image], progress.drawn[image], progress.round_end[image] = True, 0, self.n0
            rows = min(self.n0, room)
            segments.append((image, rows))
            room -= rows
        return segments

    def fill(self, segments: list[tuple[int, int]]) -> np.ndarray:
        """Write the pass's noisy inputs into the buffer; returns the count-table row of every buffer row."""
        progress, buffer = self.progress, self.counting.buffer
        row = 0
        slot_rows = np.full(self.batch_size, self.counting.slots, dtype=np.int64)
        for image, rows in segments:
            phase = self.selection_phase if progress.selecting[image] else self.estimation_phase
            drawn = int(progress.drawn[image])
            self.noise.write(buffer[row : row + rows], self.indices[image], phase, drawn, drawn + rows)
            clean = self.images[image].to(device=self.counting.device, dtype=self.noise.dtype, non_blocking=True)
            buffer[row : row + rows].mul_(self.sigma).add_(clean)
            slot_rows[row : row + rows] = self.queue.slot_of[image]
            progress.drawn[image] += rows
            row += rows
        if row < self.batch_size:
            buffer[row:].zero_()  # padding: a valid input whose predictions are not counted
        return slot_rows

    def classify(self, classify: BaseClassifierRunner, slot_rows: np.ndarray) -> None:
        """Run the base classifier on the buffer and add its predictions to the count table."""
        members, progress = self.queue.members, self.progress
        # The passes left if every image still used its whole budget: an upper bound for the compile decision.
        budget_left = (int((progress.round_end[members] - progress.drawn[members]).sum())
                       + (self.count - self.queue.joined) * (self.n0 + self.test.n_max))
        predictions = classify(self.counting.buffer, -(-budget_left // self.batch_size))
        if self.passes == 0 and (predictions.shape != (self.batch_size,)
                                 or int(predictions.max()) >= self.num_classes):
            raise PredictionOutOfRange(f"the base classifier must return {self.batch_size} class indices below "
                                       f"{self.num_classes}, got shape {tuple(predictions.shape)} with maximum "
                                       f"{int(predictions.max())}")
        self.counting.add(predictions, slot_rows)
        self.passes += 1

    def decide(self, complete: list[int]) -> None:
        """Images whose round is complete: read their counts back, decide, and let the stopped ones leave."""
        if not complete:
            return
        progress = self.progress
        round_counts = self.counting.take(self.queue.slot_of[complete])
        observed, successes = [], []
        for image, image_counts in zip(complete, round_counts):
            if progress.selecting[image]:
                progress.selection[image] = image_counts
                progress.top[image] = int(np.argmax(image_counts))  # the lowest class index on ties, as CERTIFY
                progress.selecting[image], progress.drawn[image] = False, 0
                progress.round_end[image] = self.test.looks[0]
            else:
                observed.append(image)
                successes.append(int(progress.state.successes[image]) + int(image_counts[progress.top[image]]))
        if observed:
            self.test.observe(progress.state, np.array(observed), np.array(successes))
            for image in observed:
                self._after_look(image)

    def _after_look(self, image: int) -> None:
        progress = self.progress
        if progress.state.done[image]:
            self.queue.leave(image, SequentialImage(image, progress.selection[image], int(progress.top[image]),
                                                    self.test.outcome(progress.state, image), 0.0))
        else:
            progress.round_end[image] = self.test.looks[progress.state.looks_done[image]]

    def emit(self, on_image: Callable[[SequentialImage], None]) -> None:
        """Hand on the finished images that come next in image order, with their share of the wall time."""
        queue = self.queue
        while queue.emitted in queue.finished:
            result = queue.finished.pop(queue.emitted)
            on_image(SequentialImage(result.position, result.selection_counts, result.top_class, result.outcome,
                                     float(self.progress.seconds[queue.emitted])))
            queue.emitted += 1
