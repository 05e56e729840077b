"""Batched Monte-Carlo class counting: the hot loop of randomized smoothing.

Each input needs draws in one or more phases (CERTIFY: n0 selection draws
and n estimation draws; PREDICT: n draws). The sampler lays the draws of all
inputs end to end in one stream and cuts it into forward passes of exactly
`batch_size` (image, draw) pairs, so one pass may hold the last draws of one
image and the first of the next. The last pass is padded to the same shape
(a compiled model then sees one static shape); padded rows are not counted.
Counts are integer tensors on the device; the host reads them back once per
chunk of finished images, never per pass.

Noise: draw j of phase p of the input with data-set index i is a function of
(seed, i, p, j) alone, on every device. The draws of a phase are cut into
blocks of `noise_block_size` draws; block k is the standard normal tensor
that PyTorch's CPU generator (Mersenne Twister) draws after
`manual_seed(blake2b(f"{seed}:{i}:{p}:{k}"))`, in the model's dtype. The
blocks are always drawn on the CPU and copied to the device: CUDA's own
normal generator lays its counters out by the GPU's number of SMs, so its
draws differ between GPU models, while the CPU definition is the same
everywhere (and is the stream every CPU run has used). Counts therefore do
not depend on the batch size, on which other images share a pass, on where a
run resumed, or on the device. (Drawing 1,000 normals at once and 2 × 500
from one generator need not agree, hence fixed blocks rather than one
generator per image.) On a GPU the CPU draws one pass ahead while the device
works on the last one (pinned double buffer, asynchronous copies), with the
blocks of a pass drawn by several threads (benchmarks/noise_cost.py measures
the rate: about 250 M values/s per core, so a 10,000-draw CIFAR-10 pass takes
0.11 s on one core).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from robusteval.core.interface import NonFiniteLogits, non_finite_message

logger = logging.getLogger(__name__)

# Phase ids name independent noise streams of one image.
SELECTION, ESTIMATION, PREDICTION = 0, 1, 2
NOISE_BLOCK_DRAWS = 1000
# Keep one block at most this many values (4 Mi floats = 16 MiB), whatever the image size.
NOISE_BLOCK_VALUES = 1 << 22
# Part-used blocks kept for the next write, in values (64 Mi floats = 256 MiB): the sequential sampler leaves one
# per image of its pack part-used, and a block drawn again for each slice would cost up to 1000/rows times.
PARTIAL_BLOCK_VALUES = 1 << 26
# "auto" compile: time a few warm eager passes, project the eager time still to come, and compile only when it
# is twice what compiling is expected to cost. The prior is from measured warm-ups on 2 CPU cores: the digits
# CNN costs ~12 s in a fresh process with empty compile caches (inductor's import and compile, without its
# instruction-set probe: engine.COMPILE_OPTIONS), a few seconds once the caches are warm; ResNet-18 ~15 s
# (benchmarks/RESULTS.md). A GPU compile is slower (about 30 s for a small network: an estimate;
# DEVICE_CHECK_COMPILE=1 benchmarks/device_check.sh measures it).
TIMED_EAGER_PASSES = 3
COMPILE_WARMUP_SECONDS = {"cpu": 12.0, "cuda": 30.0}
# Compiling pays when eager time still to come exceeds speed-up/(speed-up − 1) × warm-up; the digits CNN and
# ResNet-18 compile to 2-2.4× eager on the CPU (bench_certify), so break-even is near 2× the warm-up.
COMPILE_PAYOFF_FACTOR = 2.0
# ...of the part of a pass the compiler can speed up at all: matrix products in nn.Linear modules call the same BLAS
# kernels compiled or eager, so a probe pass measures their share first, and the eager time to come counts without
# it. The digits CDN (an MLP) spends 65% of a pass there and compiles to 0.9-1.0x eager (bench_certify): it used to
# pay an ~11 s compile on a first run to find that out.
LIBRARY_BOUND_MODULES: tuple[type[torch.nn.Module], ...] = (torch.nn.Linear,)
NOISE_SCHEME = "torch-normal-blocks-v1"


class PredictionOutOfRange(ValueError):
    """The base classifier returned a class index outside [0, num_classes) on some pass (a model with more logit
    columns than classes): its rows are counted nowhere, and the run stops at the next read-back of counts."""


class RangeCheck:
    """Out-of-range predictions of every pass, tracked on the device (no host sync per pass) and raised on read-back.

    route() returns each row's flat count index with out-of-range rows sent to the padding index, so they never
    add to another image's row; check() raises once any pass had one.
    """

    def __init__(self, num_classes: int, device: torch.device):
        self.num_classes = num_classes
        self.smallest = torch.zeros((), dtype=torch.int64, device=device)
        self.largest = torch.zeros((), dtype=torch.int64, device=device)

    def route(self, flat_row_start: Tensor, predictions: Tensor, padding: Tensor | int) -> Tensor:
        predictions = predictions.to(torch.int64)
        self.smallest = torch.minimum(self.smallest, predictions.min())
        self.largest = torch.maximum(self.largest, predictions.max())
        valid = (predictions >= 0) & (predictions < self.num_classes)
        return torch.where(valid, flat_row_start + predictions, padding)

    def check(self) -> None:
        smallest, largest = int(self.smallest), int(self.largest)
        if smallest < 0 or largest >= self.num_classes:
            raise PredictionOutOfRange(f"the base classifier returned class indices from {smallest} to {largest}; "
                                       f"it must return indices below {self.num_classes} on every pass")


@dataclass(frozen=True)
class Phase:
    """`draws` noise draws per input from the stream with id `stream`."""

    stream: int
    draws: int


def compile_payoff_seconds(device_type: str) -> float:
    """Eager seconds still to run above which compiling pays off on this kind of device."""
    kind = device_type if device_type in COMPILE_WARMUP_SECONDS else "cpu"
    return COMPILE_PAYOFF_FACTOR * COMPILE_WARMUP_SECONDS[kind]


def library_bound_share(model: torch.nn.Module, classify: Callable[[Tensor], Tensor], noisy: Tensor,
                        clock: Callable[[], float] = time.perf_counter) -> float:
    """The share of one eager pass of `classify` spent inside `model`'s LIBRARY_BOUND_MODULES (0 without any).

    Timed with forward hooks on those modules (no profiler: its start-up costs seconds), on a CPU pass, where the
    host clock is the device's.
    """
    modules = [m for m in model.modules() if isinstance(m, LIBRARY_BOUND_MODULES)]
    if not modules:
        return 0.0
    inside = [0.0]
    started: dict[int, float] = {}

    def enter(module: torch.nn.Module, _inputs: Any) -> None:
        started[id(module)] = clock()

    def leave(module: torch.nn.Module, _inputs: Any, _output: Any) -> None:
        inside[0] += clock() - started.pop(id(module))

    handles = [m.register_forward_pre_hook(enter) for m in modules] + [m.register_forward_hook(leave) for m in modules]
    try:
        begun = clock()
        classify(noisy)
        total = clock() - begun
    finally:
        for handle in handles:
            handle.remove()
    return min(1.0, inside[0] / total) if total > 0 else 0.0


def noise_block_size(input_shape: Sequence[int]) -> int:
    """Draws per noise block: 1,000, fewer for large images (a function of the shape only)."""
    values = int(np.prod(input_shape))
    return max(1, min(NOISE_BLOCK_DRAWS, NOISE_BLOCK_VALUES // max(values, 1)))


class NoiseSource:
    """Standard normal draws addressed by (image index, phase, draw index), drawn on the CPU for any device.

    device is where the draws are used (the passes' buffers live there); write()
    fills a tensor on any device with the same values. threads > 1 draws the
    blocks of a write in parallel (each block has its own seed, so the values do
    not depend on it); the default is one thread when the model runs on the CPU
    (its own threads already take every core, and a drawing pool beside them
    cost 1.2-1.5x the whole certify call on cdn: bench_certify) and up to 8
    threads for a GPU, whose passes need far more draws per second.
    """

    def __init__(self, seed: int, input_shape: Sequence[int], device: torch.device, dtype: torch.dtype,
                 threads: int | None = None):
        self.seed = int(seed)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.device = torch.device(device)
        self.dtype = dtype
        self.block = noise_block_size(self.input_shape)
        if threads is None:
            threads = 1 if self.device.type == "cpu" else min(8, os.cpu_count() or 1)
        self.threads = max(1, int(threads))
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="noise") if self.threads > 1 else None
        self._local = threading.local()  # one generator per drawing thread
        # Blocks a write used only in part (on the CPU), least recently used first: a later write takes their rest.
        self._partial: dict[tuple[int, int, int], Tensor] = {}
        self._partial_capacity = max(4, PARTIAL_BLOCK_VALUES // (self.block * math.prod(self.input_shape)))
        self._partial_lock = threading.Lock()

    def __del__(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False)

    def block_seed(self, index: int, stream: int, block: int) -> int:
        """A 64-bit seed for one block, well mixed from (seed, index, stream, block)."""
        key = f"{self.seed}:{index}:{stream}:{block}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")

    def _generator(self) -> torch.Generator:
        generator = getattr(self._local, "generator", None)
        if generator is None:
            generator = self._local.generator = torch.Generator(device="cpu")
        return generator

    def _fill(self, out: Tensor, index: int, stream: int, block: int) -> None:
        generator = self._generator()
        generator.manual_seed(self.block_seed(index, stream, block))
        if out.device.type == "cpu":
            out.normal_(generator=generator)
        else:  # the CPU definition, copied (passes stage their noise on the CPU and avoid this per-block copy)
            out.copy_(torch.empty(out.shape, dtype=out.dtype).normal_(generator=generator))

    def _partial_block(self, key: tuple[int, int, int], rows: int, last_use: bool) -> Tensor:
        """The block `key` (drawn once, then kept until `last_use`: the write that takes its last rows)."""
        with self._partial_lock:
            cached = self._partial.pop(key, None)
        if cached is None:
            cached = torch.empty((rows, *self.input_shape), dtype=self.dtype)
            self._fill(cached, *key)
        if not last_use:
            with self._partial_lock:
                self._partial[key] = cached  # now the most recently used
                while len(self._partial) > self._partial_capacity:
                    del self._partial[next(iter(self._partial))]
        return cached

    def write(self, out: Tensor, index: int, phase: Phase, start: int, stop: int) -> None:
        """Write draws [start, stop) of `phase` of image `index` into out (stop − start rows)."""
        pieces: list[tuple[int, int, int, int, int]] = []  # (block, lo, hi, block size, offset in out)
        offset = 0
        for block in range(start // self.block, (stop - 1) // self.block + 1):
            block_start = block * self.block
            block_stop = min(block_start + self.block, phase.draws)
            lo, hi = max(start, block_start), min(stop, block_stop)
            pieces.append((block, lo - block_start, hi - block_start, block_stop - block_start, offset))
            offset += hi - lo
        # Inference mode is per thread: the pool's threads must take the caller's, or writing into an
        # inference tensor (the sampler's passes run under torch.inference_mode) is refused.
        inference = torch.is_inference_mode_enabled()

        def draw(piece: tuple[int, int, int, int, int]) -> None:
            block, lo, hi, size, at = piece
            with torch.inference_mode(inference):
                if lo == 0 and hi == size:
                    self._fill(out[at : at + size], index, phase.stream, block)
                else:
                    block_values = self._partial_block((index, phase.stream, block), size, last_use=hi == size)
                    out[at : at + hi - lo].copy_(block_values[lo:hi])

        if self._pool is None or len(pieces) == 1:
            for piece in pieces:
                draw(piece)
        else:
            list(self._pool.map(draw, pieces))


Classify = Callable[[Tensor], Tensor]
"""classify(noisy) -> (B,) predicted classes of the base classifier on a pass of noisy inputs."""


class BaseClassifierRunner:
    """Runs the base classifier eagerly or compiled, and decides between them in "auto" mode.

    compile: True (compile before the first pass), False (never) or None
    ("auto"). Auto measures instead of guessing: after one warm-up pass it
    times TIMED_EAGER_PASSES eager passes, projects the eager time of the
    passes still to run from their median, and compiles only when that,
    less the share `probe` (if given) measures in library-bound modules
    (`library_bound_share`), is more than compile_payoff_seconds(device_type).
    Once compiled it
    times the compiled passes the same way and goes back to eager if they are
    not faster (a model the compiler cannot speed up costs the warm-up once,
    not the rest of the run), and goes on eagerly, with a warning, when
    compiling fails (no C++ compiler, a toolchain without the CPU's vector
    instructions): auto is a speed choice, not a reason to stop a run.
    compile=True raises instead. `timing` holds what was measured.
    make_compiled builds the compiled classifier; it is only called when needed.
    clock: the timer (a parameter so that tests can drive the decision).
    """

    def __init__(self, eager: Classify, make_compiled: Callable[[], Classify] | None, compile: bool | None,
                 clock: Callable[[], float] = time.perf_counter, device_type: str = "cpu",
                 probe: Callable[[Tensor], float] | None = None, model_name: str = "the model"):
        self.eager = eager
        # Whether a pass gave a row of non-finite logits (a prediction of -1, `finite_argmax`): a device flag
        # gathered without waiting for the device, read by `require_finite` where counts are read back anyway.
        self.model_name = model_name
        self._non_finite: Tensor | None = None
        self._make_compiled = make_compiled
        self.policy = compile if make_compiled is not None else False
        self.payoff_seconds = compile_payoff_seconds(device_type)
        self._compiled: Classify | None = None
        self._clock = clock
        self._probe = probe
        self._eager_times: list[float] = []
        self._compiled_times: list[float] = []
        self.timing: dict[str, float] = {}

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def _timed(self, classify: Classify, noisy: Tensor) -> tuple[Tensor, float]:
        started = self._clock()
        predictions = classify(noisy)
        int(predictions[0])  # wait for the device, so the timing is real
        return predictions, self._clock() - started

    def __call__(self, noisy: Tensor, passes_left: int) -> Tensor:
        """The base classifier's classes for the rows of `noisy` (a non-finite row counts as class 0 until
        `require_finite` stops the run)."""
        predictions = self._classify(noisy, passes_left)
        bad = (predictions < 0).any()
        self._non_finite = bad if self._non_finite is None else self._non_finite | bad
        return predictions.clamp_min(0)

    def require_finite(self) -> None:
        """Stop the run (NonFiniteLogits naming the model) if any pass so far gave non-finite logits."""
        if self._non_finite is not None and bool(self._non_finite):
            raise NonFiniteLogits(non_finite_message(self.model_name, "on noisy inputs"))

    def _classify(self, noisy: Tensor, passes_left: int) -> Tensor:
        if self.policy and self._compiled is None:
            self._compiled = self._make_compiled()  # type: ignore[misc]
        if self._compiled is not None:
            if self.policy is not None or len(self._compiled_times) > TIMED_EAGER_PASSES:
                return self._compiled(noisy)
            return self._compiled_pass(noisy)
        if self.policy is False or len(self._eager_times) > TIMED_EAGER_PASSES:
            return self.eager(noisy)
        predictions, seconds = self._timed(self.eager, noisy)
        self._eager_times.append(seconds)  # the first is a warm-up
        if len(self._eager_times) > TIMED_EAGER_PASSES:
            pass_seconds = float(np.median(self._eager_times[1:]))
            projected = pass_seconds * passes_left
            self.timing.update(eager_pass_seconds=pass_seconds, projected_eager_seconds=projected)
            if projected > self.payoff_seconds and self._probe is not None:
                # Only worth a probe pass where compiling is otherwise chosen.
                self.timing["library_bound_share"] = share = float(self._probe(noisy))
                projected *= 1.0 - share
            if projected > self.payoff_seconds:
                self._compiled = self._make_compiled()  # type: ignore[misc]
            logger.info("eager pass %.4f s, %d passes left, about %.0f s eager: %s", pass_seconds, passes_left,
                        projected, "compiling" if self._compiled is not None else "staying eager")
        return predictions

    def _compiled_pass(self, noisy: Tensor) -> Tensor:
        """An auto-compiled pass while it is being timed: the first one compiles, the next are compared to eager."""
        try:
            predictions, seconds = self._timed(self._compiled, noisy)  # type: ignore[arg-type]
        except Exception as error:  # noqa: BLE001 - any compiler failure; the eager pass re-raises model errors
            if self._compiled_times:  # it compiled and ran: not a compiler failure
                raise
            first_line = (str(error).splitlines() or [""])[0]
            logger.warning("compiling the base classifier failed (%s: %s); going on eagerly", type(error).__name__,
                           first_line)
            self._compiled = None
            self.policy = False
            return self.eager(noisy)
        self._compiled_times.append(seconds)
        if len(self._compiled_times) == 1:
            self.timing["compile_warmup_seconds"] = seconds
        elif len(self._compiled_times) > TIMED_EAGER_PASSES:
            pass_seconds = float(np.median(self._compiled_times[1:]))
            self.timing["compiled_pass_seconds"] = pass_seconds
            if pass_seconds >= self.timing["eager_pass_seconds"]:
                logger.info("compiled pass %.4f s is no faster than eager %.4f s: back to eager", pass_seconds,
                            self.timing["eager_pass_seconds"])
                self._compiled = None
                self.policy = False
        return predictions


@dataclass(frozen=True)
class ChunkCounts:
    """Counts of finished images at positions [start, stop): shape (stop − start, phases, classes)."""

    start: int
    stop: int
    counts: np.ndarray
    seconds: float


def count_classes(
    classify: BaseClassifierRunner,
    images: Tensor,
    indices: Sequence[int],
    sigma: float,
    phases: Sequence[Phase],
    num_classes: int,
    noise: NoiseSource,
    batch_size: int,
    chunk_images: int,
    on_chunk: Callable[[ChunkCounts], None],
) -> None:
    """Count the base classifier's predictions on image + σ·noise for every image, phase and class.

    images: (N, C, H, W) clean inputs (any device; moved pass by pass).
    The noisy inputs of a pass are built in place in one buffer, image by image
    (noise scaled, clean image broadcast onto its rows), so no (batch, C, H, W)
    copy of the clean images is ever gathered.
    indices: data-set index of each image, which addresses its noise.
    on_chunk is called in order for every `chunk_images` consecutive images
    (the last chunk may be shorter) once all their draws are counted.
    Call it inside torch.inference_mode() or torch.no_grad().
    """
    count = int(images.shape[0])
    if count == 0:
        return
    if len(indices) != count:
        raise ValueError(f"need one data-set index per image, got {len(indices)} for {count} images")
    votes = _Votes(phases, num_classes, count, min(batch_size, count * sum(p.draws for p in phases)), chunk_images,
                   noise.device)
    noisy = _NoisyPasses(images, indices, sigma, phases, noise, votes.batch)
    passes = -(-votes.total // votes.batch)
    for pass_number in range(passes):
        start = pass_number * votes.batch
        stop = min(start + votes.batch, votes.total)
        predictions = classify(noisy.fill(start, stop), passes - pass_number - 1)
        if pass_number == 0 and (predictions.shape != (votes.batch,) or int(predictions.max()) >= num_classes):
            # A model whose logits have more columns than num_classes would be miscounted silently (later passes:
            # _Votes' range check).
            raise PredictionOutOfRange(f"the base classifier must return {votes.batch} class indices below "
                                       f"{num_classes}, got shape {tuple(predictions.shape)} with maximum "
                                       f"{int(predictions.max())}")
        votes.add(start, predictions)
        votes.flush(stop // votes.per_image, on_chunk)


class _NoisyPasses:
    """Builds each pass's noisy inputs in one buffer: rows [start, stop) of the (image, phase, draw) sequence.

    On the CPU the noise is drawn straight into the buffer. On another device it is drawn into one of
    two pinned CPU buffers and copied asynchronously, so drawing pass k+1 overlaps the device's work on
    pass k; an event per staging buffer keeps a buffer from being redrawn before its copy is done.
    """

    def __init__(self, images: Tensor, indices: Sequence[int], sigma: float, phases: Sequence[Phase],
                 noise: NoiseSource, batch: int, staged: bool | None = None):
        # staged: draw into CPU buffers and copy (default: when the device is not the CPU; tests force it).
        self.images, self.indices, self.sigma, self.phases, self.noise = images, indices, sigma, phases, noise
        self.per_image = sum(p.draws for p in phases)
        self.boundaries = np.cumsum([0] + [p.draws for p in phases])
        shape = (batch, *images.shape[1:])
        self.buffer = torch.zeros(shape, dtype=noise.dtype, device=noise.device)
        self.staging: list[Tensor] = []
        self.copied: list[Any] = []
        if noise.device.type != "cpu" if staged is None else staged:
            pin = noise.device.type == "cuda"
            self.staging = [torch.zeros(shape, dtype=noise.dtype, pin_memory=pin) for _ in range(2)]
            self.copied = [torch.cuda.Event() if pin else None for _ in range(2)]
        self.passes = 0

    def fill(self, start: int, stop: int) -> Tensor:
        first_image, last_image = start // self.per_image, (stop - 1) // self.per_image
        clean_images = self.images[first_image : last_image + 1].to(device=self.noise.device, dtype=self.noise.dtype,
                                                                     non_blocking=True)
        target = self.buffer
        if self.staging:
            slot = self.passes % 2
            if self.copied[slot] is not None:
                self.copied[slot].synchronize()  # its last copy to the device has finished
            target = self.staging[slot]
        row = 0
        rows: list[tuple[int, int, int]] = []
        for image in range(first_image, last_image + 1):
            image_row = row
            row = self._write_noise(target, image, start, stop, row)
            rows.append((image, image_row, row))
        if self.staging:
            self.buffer.copy_(target, non_blocking=True)
            if self.copied[slot] is not None:
                self.copied[slot].record()
        self.passes += 1
        for image, lo, hi in rows:
            self.buffer[lo:hi].mul_(self.sigma).add_(clean_images[image - first_image])
        if row < self.buffer.shape[0]:
            self.buffer[row:].zero_()  # padding: a valid input whose predictions are not counted
        return self.buffer

    def _write_noise(self, target: Tensor, image: int, start: int, stop: int, row: int) -> int:
        """The noise of the (image, phase) segments this pass covers, from `row` on; returns the next row."""
        image_lo = max(start, image * self.per_image) - image * self.per_image
        image_hi = min(stop, (image + 1) * self.per_image) - image * self.per_image
        for phase_number, phase in enumerate(self.phases):
            lo = max(image_lo, int(self.boundaries[phase_number]))
            hi = min(image_hi, int(self.boundaries[phase_number + 1]))
            if lo >= hi:
                continue
            phase_lo = lo - int(self.boundaries[phase_number])
            self.noise.write(target[row : row + hi - lo], self.indices[image], phase, phase_lo,
                             phase_lo + hi - lo)
            row += hi - lo
        return row


class _Votes:
    """Per-image, per-phase class counts on the device, handed out chunk by chunk once complete.

    Counts live in a ring of image slots: a pass touches at most batch // per_image + 2 images
    beyond the unfinished chunk; slot `ring` collects the padded rows.
    """

    def __init__(self, phases: Sequence[Phase], num_classes: int, count: int, batch: int, chunk_images: int,
                 device: torch.device):
        self.phases, self.num_classes, self.count, self.batch = phases, num_classes, count, batch
        self.chunk_images, self.device = chunk_images, device
        self.per_image = sum(p.draws for p in phases)
        self.total = count * self.per_image
        self.boundaries = np.cumsum([0] + [p.draws for p in phases])
        self.ring = chunk_images + batch // self.per_image + 2
        self.counts = torch.zeros((self.ring + 1) * len(phases) * num_classes, dtype=torch.int64, device=device)
        self.ones = torch.ones(batch, dtype=torch.int64, device=device)
        self.offsets = torch.arange(batch, device=device)
        self.range_check = RangeCheck(num_classes, device)
        self.chunk_start = 0
        self.chunk_clock = time.perf_counter()

    def add(self, start: int, predictions: Tensor) -> None:
        """Count the predictions of the pass whose first row is `start`."""
        rows = self.offsets + start
        position = rows // self.per_image
        within = rows - position * self.per_image
        phase_slot = torch.zeros_like(rows)
        for boundary in self.boundaries[1:-1]:
            phase_slot += within >= int(boundary)
        slot = torch.where(rows < self.total, position % self.ring, torch.full_like(rows, self.ring))
        row_start = (slot * len(self.phases) + phase_slot) * self.num_classes
        flat = self.range_check.route(row_start, predictions, self.ring * len(self.phases) * self.num_classes)
        self.counts.scatter_add_(0, flat, self.ones)

    def flush(self, finished: int, on_chunk: Callable[[ChunkCounts], None]) -> None:
        """Hand out every chunk whose images are all among the first `finished`, and free their slots."""
        while self.chunk_start < self.count and min(self.chunk_start + self.chunk_images, self.count) <= finished:
            chunk_stop = min(self.chunk_start + self.chunk_images, self.count)
            self.range_check.check()  # before any count is handed on
            slots = torch.arange(self.chunk_start, chunk_stop, device=self.device) % self.ring
            table = self.counts.view(self.ring + 1, len(self.phases), self.num_classes)
            chunk_counts = table[slots].cpu().numpy()
            table[slots] = 0
            now = time.perf_counter()
            on_chunk(ChunkCounts(self.chunk_start, chunk_stop, chunk_counts, now - self.chunk_clock))
            self.chunk_clock = now
            self.chunk_start = chunk_stop
