"""Certification engine: Cohen et al.'s CERTIFY and PREDICT over a data set.

`certify(model, dataset, sigma=...)` and `predict(...)` prepare a
`SmoothingJob` (model, weights and data resolved by `robusteval.jobs`, the
same job `robusteval certify` runs) that smooths a model's base classifier
with Gaussian noise of std σ, counts its predictions with the batched
sampler, turns the counts into decisions (`decisions`), and returns one
record per image plus summary figures. With `out=` (always, from the
command line) the run lives in a run directory and a re-run resumes after
the last complete batch of images.

Modes (which base classifier is smoothed):
- `direct`: x ↦ argmax logits(x + σ·n, σ): noise-conditioned models are told σ.
- `denoised`: x ↦ argmax logits(denoise(x + σ·n, σ), 0): the model's own denoiser first, or another
  model's (`denoiser=`, `--denoiser`: robusteval.model_zoo.paired), Carlini et al. 2023.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from robusteval.core import work_sizes
from robusteval.core.determinism import gpu_notes, is_deterministic
from robusteval.core.devices import device_label
from robusteval.core.errors import UsageError
from robusteval.core.fingerprints import weights_fingerprint
from robusteval.core.interface import (
    CapabilityError,
    JointModel,
    finite_argmax,
    trusted_inputs,
    validate_images,
)
from robusteval.data import ImageDataset
from robusteval.data.imagenet import order_notes
from robusteval.jobs import Job, JobOptions, Resolved, resolve, shows_keywords
from robusteval.model_zoo.factory import list_models, model_card
from robusteval.records import (
    CertifySample,
    PredictSample,
    RadiusPoint,
    SmoothingConfig,
    SmoothingSummary,
)
from robusteval.records.consistency import check_records, labels_lookup, record_problem
from robusteval.runs import SAMPLES_FILE, RunDirectory
from robusteval.runs.shards import ShardRun, shard_title
from robusteval.smoothing import decisions
from robusteval.smoothing.sampler import (
    NOISE_SCHEME,
    BaseClassifierRunner,
    ChunkCounts,
    Classify,
    NoiseSource,
    PredictionOutOfRange,
    count_classes,
    library_bound_share,
    noise_block_size,
)
from robusteval.smoothing.sequential_results import (
    sequential_figures,
    sequential_forward_passes,
    sequential_record,
)
from robusteval.smoothing.sequential_sampler import SequentialImage, count_sequentially
from robusteval.smoothing.settings import SmoothingSettings, certify_settings

logger = logging.getLogger(__name__)

@dataclass
class SmoothingResult:
    """Per-image records (in data-set order), the summary figures, and the run directory if any."""

    records: list[dict[str, Any]]
    summary: dict[str, Any]
    path: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)


def smoothing_config(
    settings: SmoothingSettings,
    model_name: str,
    dataset_name: str,
    n_images: int,
    skip: int,
    input_shape: tuple[int, ...],
    extra: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """The configuration that fixes a run's results (what config.json records and resume checks)."""
    sequential: dict[str, Any] = {}
    if settings.method == "sequential":
        # Recorded only for this method, so CERTIFY's configurations (and their run directories) are unchanged.
        test = settings.sequential_test()
        sequential = {"method": "sequential", "radii": list(settings.radii), "n_max": settings.n, **test.design()}
    return SmoothingConfig(
        kind=settings.kind, model=model_name, dataset=dataset_name, mode=settings.mode, sigma=settings.sigma,
        n0=settings.n0, n=settings.n, alpha=settings.alpha, n_images=n_images, skip=skip, seed=settings.seed,
        # The noise stream depends on the block layout and the dtype; it is drawn on the CPU on every device.
        noise=f"{NOISE_SCHEME}/{noise_block_size(input_shape)}/{str(dtype).removeprefix('torch.')}",
        **sequential, **(extra or {}),
    ).to_json()


def model_dtype(model: JointModel) -> torch.dtype:
    """The dtype the model computes in (its first floating-point parameter; float32 without one)."""
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


# Inductor's freezing folds the weights into the compiled graph as constants (pre-packed for oneDNN on
# CPU): median forward throughput at batch 1,000 on 2 cores +6% for ResNet-18, +2% for the digits CNN
# (interleaved timings). Sound here because the weights never change during a run.
# vec_isa_ok: the first compile on a machine otherwise builds and loads a test program for each vector
# instruction set /proc/cpuinfo lists (11-13 s of a 20-23 s first compile of the digits CNN on 2 cores);
# trusting cpuinfo, as TORCHINDUCTOR_VEC_ISA_OK=1 does, leaves 7-8 s. A toolchain that cannot build them
# fails the compile, and an automatic compile then goes on eagerly (BaseClassifierRunner).
COMPILE_OPTIONS = {"freezing": True, "cpp.vec_isa_ok": True}


def _base_classifier(
    model: JointModel, settings: SmoothingSettings, batch: int, device: torch.device, dtype: torch.dtype,
    compile: bool | None,
) -> BaseClassifierRunner:
    sigma_rows = torch.full((batch,), settings.sigma, device=device, dtype=dtype)
    clean_rows = torch.zeros((batch,), device=device, dtype=dtype)

    if settings.mode == "direct":
        def classify(noisy: Tensor) -> Tensor:
            return finite_argmax(model.logits(noisy, sigma_rows))

        # The probe times on the host clock, which is the device's only on a CPU.
        probe = (lambda noisy: library_bound_share(model, classify, noisy)) if device.type == "cpu" else None
        return BaseClassifierRunner(
            classify, lambda: torch.compile(classify, dynamic=False, options=COMPILE_OPTIONS), compile,
            device_type=device.type, probe=probe, model_name=model.name)

    def head(x: Tensor) -> Tensor:
        return finite_argmax(model.logits(x, clean_rows))

    def denoise(noisy: Tensor) -> Tensor:
        # A Tweedie denoiser takes a gradient inside; its graph is freed when it returns.
        return model.denoise(noisy, sigma_rows).detach()

    def classify_denoised(noisy: Tensor) -> Tensor:
        return head(denoise(noisy))

    def make_compiled() -> Classify:
        # The denoiser may differentiate inside; only the classifier head is compiled.
        compiled_head = torch.compile(head, dynamic=False, options=COMPILE_OPTIONS)
        return lambda noisy: compiled_head(denoise(noisy))

    return BaseClassifierRunner(classify_denoised, make_compiled, compile, device_type=device.type,
                                model_name=model.name)


def _record(settings: SmoothingSettings, index: int, label: int, counts: Any, seconds: float,
            device: str | None = None) -> dict[str, Any]:
    if settings.kind == "certify":
        cert = decisions.certify_decision(counts[0], counts[1], settings.sigma, settings.alpha)
        return CertifySample(
            index=index, label=label, prediction=cert.prediction, abstain=cert.abstain, radius=cert.radius,
            correct=cert.prediction == label, pA_lower=cert.pA_lower, count=cert.count, top_class=cert.top_class,
            seconds=seconds, device=device,
        ).to_json()
    pred = decisions.predict_decision(counts[0], settings.alpha)
    return PredictSample(
        index=index, label=label, prediction=pred.prediction, abstain=pred.abstain, correct=pred.prediction == label,
        count=pred.count, runner_up_count=pred.runner_up_count, p_value=pred.p_value, seconds=seconds,
        device=device,
    ).to_json()


def summarize(config: Mapping[str, Any], records: list[dict[str, Any]], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The summary figures of a finished run from its records."""
    count = len(records)
    certify = config["kind"] == "certify"
    summary = SmoothingSummary(
        kind=config["kind"], model=config["model"], dataset=config["dataset"], mode=config["mode"],
        sigma=config["sigma"], n=config["n"], alpha=config["alpha"], n_images=count,
        abstain_rate=sum(bool(r["abstain"]) for r in records) / count if count else 0.0,
        seconds=round(sum(float(r["seconds"]) for r in records), 3),
        n0=config["n0"] if certify else None,
        certified_accuracy=[RadiusPoint(**p) for p in decisions.certified_accuracy_curve(records)] if certify else None,
        acr=decisions.average_certified_radius(records) if certify else None,
        accuracy=None if certify else (sum(bool(r["correct"]) for r in records) / count if count else 0.0),
        skip=config["skip"], seed=config["seed"], extra=dict(extra or {}),
        forward_passes=_forward_passes(config, records) if certify else None,
        sequential=sequential_figures(config, records) if config.get("method") == "sequential" else None,
    )
    return summary.to_json()


def _forward_passes(config: Mapping[str, Any], records: list[dict[str, Any]]) -> int:
    if config.get("method") == "sequential":
        return sequential_forward_passes(config, records)
    return len(records) * (int(config["n0"]) + int(config["n"]))


class SmoothingJob(Job):
    """A prepared CERTIFY or PREDICT run on images skip, skip+1, ... of a data set, with the model on its device."""

    def __init__(self, resolved: Resolved, settings: SmoothingSettings, *, n_images: int | None = None,
                 skip: int = 0, batch_size: int | None = None, compile: bool | None = None,
                 chunk_images: int | None = None):
        model, data = resolved.model, resolved.data
        if batch_size is None:  # counts do not depend on it: the device's size (1,000 on the CPU)
            batch_size = work_sizes.certify_batch(resolved.device, model.input_shape)
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        require_capabilities(model, settings.mode)
        n_images, skip = resolve_image_range(len(data), n_images, skip)
        self.dtype = model_dtype(model)
        # The weights (and files) the records depend on: resume and merge refuse records of other weights.
        weights = {"model_fingerprint": weights_fingerprint(model),
                   "file_fingerprints": resolved.options.file_fingerprints()}
        recorded = {**resolved.options.as_config(), **resolved.recorded(), **weights}
        self._freeze(smoothing_config(settings, model.name, data.name, n_images, skip, model.input_shape, recorded,
                                      dtype=self.dtype),
                     resolved.options.shard)
        # Images per appended batch of records (default: enough to fill one forward pass, at least one); a
        # shard takes whole batches of this plan (each image's noise depends on its index only).
        self.chunk_images = chunk_images or max(1, batch_size // sum(p.draws for p in settings.phases))
        part = self.shard.items(n_images, self.chunk_images) if self.shard is not None else range(n_images)
        self.first_batch = part.start // self.chunk_images
        # From here on the job works on its shard's images only: skip + part.start, ... (all of them unsharded).
        skip, n_images = skip + part.start, len(part)
        self.images = data.x[skip : skip + n_images]
        self.labels = data.y[skip : skip + n_images]
        validate_images(self.images, model.input_shape, what="images")
        _warn_sigma_mismatch(model, settings.sigma)
        self.model, self.settings, self.device = model, settings, resolved.device
        self.n_images, self.skip, self.batch_size, self.compile = n_images, skip, batch_size, compile
        self.name_parts = (settings.kind, model.name, data.name, f"s{settings.sigma:g}", settings.mode)

    def run(self, out: str | Path | RunDirectory | None = None, resume: bool = True, progress: bool = False,
            wait: bool = False, on_wait: Callable[[str], None] | None = None) -> SmoothingResult:
        """Run (or resume) the job; records of images the run directory already holds are kept, not recomputed.

        The directory is locked while the job works in it (see `Job.open_run`).
        """
        with self.opened_run(out, resume, wait=wait, on_wait=on_wait) as run_dir:
            if run_dir is not None:
                # Resuming counts the records, so they must be exactly the first images, once each, of this kind.
                run_dir.check_records(range(self.skip, self.skip + self.n_images), in_order=True,
                                      check=self._record_problem)
            return self._run(run_dir, progress)

    def _record_problem(self, record: dict[str, Any]) -> str | None:
        """What makes a stored record impossible for this job (None when it fits)."""
        kind = self.settings.kind
        if ("radius" if kind == "certify" else "p_value") not in record:
            return f"it is not a {kind} record"
        found = record_problem(kind, self.config, record,
                               data_labels=labels_lookup(self.labels.tolist(), self.skip))
        return None if found is None else f"field {found[0]}: {found[1]}"

    def _run(self, run_dir: RunDirectory | None, progress: bool) -> SmoothingResult:
        records: list[dict[str, Any]] = run_dir.records if run_dir is not None else []
        bar = tqdm(total=self.n_images, initial=len(records), disable=not progress, unit="img",
                   desc=shard_title(self.settings.kind, self.shard), leave=False)
        try:
            compiled = self._count(records, run_dir, bar)
        finally:
            bar.close()
        extra = {"batch_size": self.batch_size, "compile": compiled, "deterministic": is_deterministic()}
        notes = gpu_notes(self.model.device) + order_notes(self.config.get("image_order"))
        summary = summarize(self.config, records, {**extra, **({"notes": notes} if notes else {})})
        if run_dir is not None:
            run_dir.write_summary(summary)
        return SmoothingResult(records, summary, run_dir.path if run_dir is not None else None, dict(self.config))

    def _count(self, records: list[dict[str, Any]], run_dir: RunDirectory | None, bar: Any) -> bool:
        """Count the base classifier's votes on the images not done yet; returns whether it ran compiled."""
        settings, model, done = self.settings, self.model, len(records)
        remaining = self.n_images - done
        if not remaining:
            return False
        per_image = sum(p.draws for p in settings.phases)
        chunk_images = self.chunk_images
        # Batches are numbered as in the unsharded run, so merged records equal its records.
        add_records = _RecordSink(records, run_dir, bar, settings.kind, self.first_batch)

        placed = device_label(self.device)

        def on_chunk(chunk: ChunkCounts) -> None:
            runner.require_finite()  # before records counted from NaN logits are written
            share = chunk.seconds / (chunk.stop - chunk.start)
            add_records([_record(settings, self.skip + done + p, int(self.labels[done + p]),
                                 chunk.counts[p - chunk.start], round(share, 4), placed)
                         for p in range(chunk.start, chunk.stop)])

        device = model.device
        noise = NoiseSource(settings.seed, model.input_shape, device, self.dtype)
        batch = min(self.batch_size, remaining * per_image)
        runner = _base_classifier(model, settings, batch, device, self.dtype, self.compile)
        grad_context = torch.inference_mode() if settings.mode == "direct" else torch.no_grad()
        was_training = model.training
        model.eval()
        indices = [self.skip + done + i for i in range(remaining)]
        try:
            with grad_context, trusted_inputs():
                if settings.method == "sequential":
                    count_sequentially(runner, self.images[done:], indices, settings.sigma, settings.n0,
                                       settings.sequential_test(), model.num_classes, noise, batch,
                                       self._on_sequential_image(done, chunk_images, add_records, placed,
                                                                 runner))
                else:
                    count_classes(runner, self.images[done:], indices, settings.sigma, settings.phases,
                                  model.num_classes, noise, batch, chunk_images, on_chunk)
        except PredictionOutOfRange as error:
            raise PredictionOutOfRange(f"model {model.name!r} (num_classes {model.num_classes}): {error}") from None
        finally:
            model.train(was_training)
        return runner.compiled

    def _on_sequential_image(self, done: int, chunk_images: int, add_records: Callable[[list[dict[str, Any]]], None],
                             placed: str, runner: BaseClassifierRunner) -> Callable[[SequentialImage], None]:
        """The sequential sampler's callback: records handed on (in image order) every chunk_images images."""
        pending: list[dict[str, Any]] = []

        def on_image(result: SequentialImage) -> None:
            runner.require_finite()
            position = done + result.position
            pending.append(sequential_record(self.skip + position, int(self.labels[position]), result, placed))
            if len(pending) == chunk_images or position == self.n_images - 1:
                add_records(list(pending))
                pending.clear()

        return on_image


class _RecordSink:
    """Appends new records: to the run directory as one batch, to the records in memory, and to the progress bar."""

    def __init__(self, records: list[dict[str, Any]], run_dir: RunDirectory | None, bar: Any, kind: str,
                 first_batch: int = 0):
        self.records, self.run_dir, self.bar = records, run_dir, bar
        self.label = "cert_acc@0" if kind == "certify" else "acc"
        self.batch_number = first_batch + (run_dir.completed_batches if run_dir is not None else 0)
        self.correct = sum(bool(r["correct"]) for r in records)

    def __call__(self, new: list[dict[str, Any]]) -> None:
        if self.run_dir is not None:
            self.run_dir.append_batch(self.batch_number, new)
            self.batch_number += 1
        self.records.extend(new)
        self.correct += sum(bool(r["correct"]) for r in new)
        self.bar.update(len(new))
        self.bar.set_postfix({self.label: f"{self.correct / len(self.records):.3f}"})


def resolve_image_range(available: int, n_images: int | None, skip: int) -> tuple[int, int]:
    if skip < 0 or skip >= available:
        raise UsageError(f"skip must be in [0, {available}) for a data set of {available} images, got {skip}")
    if n_images is None:
        n_images = available - skip
    if n_images < 1 or skip + n_images > available:
        raise UsageError(
            f"n_images must be in [1, {available - skip}] with skip {skip} on {available} images, got {n_images}"
        )
    return n_images, skip


def require_capabilities(model: JointModel, mode: str) -> None:
    """Raise CapabilityError unless the model can be smoothed in this mode."""
    needed = ("logits", "denoise") if mode == "denoised" else ("logits",)
    for capability in needed:
        if capability not in model.capabilities:
            raise CapabilityError(model.name, capability, model.capabilities)


def _warn_sigma_mismatch(model: JointModel, sigma: float) -> None:
    """Gaussian-augmentation baselines are meant to be smoothed at their training σ."""
    if model.name not in list_models():
        return
    trained = model_card(model.name).recipe.get("sigma")
    if trained is not None and abs(float(trained) - sigma) > 1e-12:
        logger.warning("model %s was trained with noise sigma %s but is smoothed at sigma %s", model.name, trained, sigma)


@shows_keywords()
def prepare_smoothing(model: JointModel | str, dataset: Any, settings: SmoothingSettings, *,
                      n_images: int | None = None, skip: int = 0, batch_size: int | None = None,
                      compile: bool | None = None, **options: Any) -> SmoothingJob:
    """Resolve model, weights and data (`robusteval.jobs.JobOptions`) into a prepared CERTIFY or PREDICT job."""
    # Only the images the run needs are read (ImageNet decodes them one by one).
    wanted = n_images is not None and n_images >= 1 and skip >= 0
    resolved = resolve(model, JobOptions.of(dataset, options), limit=skip + n_images if wanted else None,
                       shardable=True, uses_denoiser=settings.mode == "denoised")
    return SmoothingJob(resolved, settings, n_images=n_images, skip=skip, batch_size=batch_size, compile=compile)


def _smooth(kind: str, model: JointModel | str, dataset: Any, *, sigma: float, n0: int, n: int | None,
            alpha: float = 0.001, mode: str = "direct", seed: int = 0, method: str = "cohen",
            radii: Sequence[float] | None = None, n_max: int | None = None, futility: float | None = None,
            design: str | None = None, out: str | Path | None = None,
            resume: bool = True, progress: bool = False, **keywords: Any) -> SmoothingResult:
    """The one body of `certify` and `predict`: settings checked first, then the prepared job run."""
    if kind == "certify":
        settings = certify_settings(sigma=sigma, n0=n0, n=n, alpha=alpha, mode=mode, seed=seed, method=method,
                                    radii=radii, n_max=n_max, futility=futility, design=design)
    else:
        if n_max is not None or radii is not None or futility is not None or design is not None or method != "cohen":
            raise UsageError("method, radii, n_max, futility and design are certify's; predict draws n per image")
        settings = SmoothingSettings(kind, sigma=sigma, n=1000 if n is None else n, alpha=alpha, n0=n0, mode=mode,
                                     seed=seed)
    return prepare_smoothing(model, dataset, settings, **keywords).run(out=out, resume=resume, progress=progress)


@shows_keywords(_smooth, prepare_smoothing)
def certify(model: JointModel | str, dataset: ImageDataset | tuple[Tensor, Tensor] | str = "digits", *,
            sigma: float, n0: int = 100, n: int | None = None, method: str = "cohen",
            radii: Sequence[float] | None = None, n_max: int | None = None, futility: float | None = None,
            design: str | None = None, **keywords: Any) -> SmoothingResult:
    """CERTIFY (Cohen et al. 2019) every image: a prediction or abstention and a certified L2 radius.

    model: a JointModel (moved to `device` if given) or a registered model name.
    dataset: an ImageDataset, a data set name or .npz path (its test split) or (x, y) tensors.
    Each image gets n0 selection draws and n (default 10,000) independent
    estimation draws of N(0, σ²I) noise, a function of (seed, image index)
    only. Records hold index, label, prediction (None when abstaining),
    abstain, radius, correct, pA_lower, count (ĉ among the n draws),
    top_class and seconds (the image's share of the wall time).

    method: "cohen" (CERTIFY with n estimation draws) or "sequential"
    (`robusteval.smoothing.sequential`): after the n0 selection draws, draw in
    rounds until every radius of `radii` (default 0.25, 0.5, 0.75, 1.0) is
    decided, at most n_max (default 100,000) draws, error ≤ α per image over
    all looks and radii; design "spending" (default: CERTIFY's power at
    n_max, early stops on 5% of α) or "betting" (all of α on the betting
    sequence: earlier stops, fewer certificates near a threshold); futility
    (default 0.02; 0: never) gives a radius up once its chance to be
    certified at n_max is below it even at p_A's upper 95% bound (no wrong
    certificate, little power lost: see the module). n belongs to "cohen"
    only, radii, n_max, futility and design to "sequential" only (giving them
    to the other method is an error). Its records add pA_upper, draws and
    largest_certified_radius (None when abstaining); its radius is σ·Φ⁻¹ of
    the lower bound at the stop. The
    summary adds grid_certified_accuracy, draws_per_image (mean, median, max)
    and, as for CERTIFY, forward_passes.

    Keywords (as for `predict`): alpha (0.001), mode ('direct' or 'denoised'),
    seed (0); n_images (default: all after skip), skip (0), batch_size (1000,
    (image, draw) pairs per forward pass), compile (True / False / None for
    "when it pays off"); out (a run directory, resumed when it holds the same
    configuration; None: in memory), resume (True), progress (False); and the
    `robusteval.jobs.JobOptions` of every evaluation (all listed at the end); with
    mode='denoised', `denoiser` and `denoiser_checkpoint` put another model's
    denoiser before this model's classifier.
    """
    return _smooth("certify", model, dataset, sigma=sigma, n0=n0, n=n, method=method, radii=radii, n_max=n_max,
                   futility=futility, design=design, **keywords)


@shows_keywords(_smooth, prepare_smoothing, without=("n0", "method", "radii", "n_max", "futility", "design"))
def predict(model: JointModel | str, dataset: ImageDataset | tuple[Tensor, Tensor] | str = "digits", *,
            sigma: float, n: int = 1000, **keywords: Any) -> SmoothingResult:
    """PREDICT (Cohen et al. 2019) every image: the smoothed class, or abstain when not significant at α.

    The arguments of `certify` without n0, method, radii, n_max, futility and design. Records hold index, label,
    prediction (None when abstaining), abstain, correct, count and
    runner_up_count (the top two counts of n draws), p_value and seconds.
    """
    return _smooth("predict", model, dataset, sigma=sigma, n0=0, n=n, **keywords)


class _SmoothingMerger:
    """How the shards of a certify or predict run merge (`robusteval.scale.merge`): the summary from all records."""

    def index_range(self, config: dict[str, Any]) -> range:
        return range(config["skip"], config["skip"] + config["n_images"])

    def check_records(self, config: dict[str, Any], shard: ShardRun) -> None:
        check_records(Path(shard.source) / SAMPLES_FILE, config["kind"], config, shard.records,
                      remedy="re-run that shard with --no-resume")

    def summary(self, config: dict[str, Any], shards: list[ShardRun], records: list[dict[str, Any]]) -> dict[str, Any]:
        first = shards[0].summary or {}
        # Whether the classifier ran compiled is a per-process choice (the counts are the same either way).
        compiled = any(bool((s.summary or {}).get("compile")) for s in shards)
        extra = {"batch_size": first.get("batch_size"), "compile": compiled,
                 "deterministic": all(bool((s.summary or {}).get("deterministic")) for s in shards)}
        # A shard run on a GPU without deterministic algorithms carries its note into the merged run.
        notes = sorted({note for s in shards for note in (s.summary or {}).get("notes", [])})
        return summarize(config, records, {**extra, **({"notes": notes} if notes else {})})

    def files(self, config: dict[str, Any], shards: list[ShardRun]) -> dict[str, bytes]:
        return {}


SMOOTHING_MERGER = _SmoothingMerger()
