"""Denoising runs: how well a model's own denoiser recovers x from x + σ·n (PSNR per σ).

A `denoise` run directory follows the same layout as attack and certify runs
(robusteval.runs), so reports read it like the others:

- config.json: kind "denoise", model, dataset, sigmas, n_images, seed,
  batch_size, plus provenance;
- samples.jsonl: per image {index, label, psnr: [one per σ], psnr_noisy: [one per σ]}, with the
  batch's seconds;
- summary.json: kind "denoise", model, dataset, n_images, seed, seconds and
  psnr: [{sigma, psnr, psnr_noisy}], the mean over images of the per-image
  PSNR (dB, peak 1) of the denoised image and of the noisy input.

The noise of a batch depends only on the seed and the batch's first index, so
a resumed run draws the same noise as an uninterrupted one.

`evaluate_denoising` (and `robusteval denoise`) resolve the model and data
like every evaluation (robusteval.jobs) into a `DenoiseJob`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from robusteval.core import work_sizes
from robusteval.core.errors import UsageError
from robusteval.core.fingerprints import weights_fingerprint
from robusteval.core.interface import CapabilityError, JointModel
from robusteval.jobs import Job, JobOptions, Resolved, resolve, shows_keywords
from robusteval.records import DenoiseConfig, DenoiseSample, DenoiseSummary, PsnrPoint
from robusteval.records.consistency import labels_lookup, record_problem
from robusteval.runs import RunDirectory


def per_image_psnr(estimate: Tensor, clean: Tensor) -> Tensor:
    """PSNR in dB of each image (peak 1 for [0, 1] images), as a (B,) tensor."""
    if estimate.shape != clean.shape:
        raise ValueError(f"estimate and clean must have one shape, got {tuple(estimate.shape)} and "
                         f"{tuple(clean.shape)}")
    mse = (estimate - clean).flatten(1).pow(2).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)


class DenoiseJob(Job):
    """A prepared denoise run: PSNR of the model's denoiser on the first `n_images` test images at each σ."""

    def __init__(self, resolved: Resolved, sigmas: Sequence[float] = (0.12, 0.25, 0.5), n_images: int | None = None,
                 batch_size: int | None = None, seed: int = 0):
        model, data = resolved.model, resolved.data
        if batch_size is None:
            batch_size = work_sizes.denoise_batch(resolved.device)  # 100 on the CPU
        if "denoise" not in model.capabilities:
            raise CapabilityError(resolved.model_name, "denoise", model.capabilities)
        sigmas = [float(s) for s in sigmas]
        if not sigmas or any(s <= 0 for s in sigmas):
            raise UsageError(f"sigmas must be positive noise levels, got {sigmas}")
        if batch_size <= 0:
            raise UsageError(f"batch_size must be positive, got {batch_size}")
        n_images = len(data) if n_images is None else int(n_images)
        if not 0 < n_images <= len(data):
            raise UsageError(f"n_images must be in [1, {len(data)}], got {n_images}")
        self.model, self.data, self.sigmas = model, data, sigmas
        self.n_images, self.batch_size, self.seed = n_images, batch_size, seed
        self._freeze(DenoiseConfig(model=resolved.model_name, dataset=data.name, sigmas=sigmas, n_images=n_images,
                                   seed=seed, batch_size=batch_size,
                                   model_fingerprint=weights_fingerprint(model),
                                   file_fingerprints=resolved.options.file_fingerprints(),
                                   model_source=resolved.model_source,
                                   preprocessing=resolved.preprocessing).to_json())
        self.name_parts = ("denoise", resolved.model_name, data.name)

    def run(self, out: str | Path | RunDirectory | None = None, resume: bool = True, progress: bool = False,
            wait: bool = False, on_wait: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Write (or resume) the run directory `out` (default: runs/denoise-...); returns the summary and its path.

        The directory is locked while the job works in it (see `Job.open_run`).
        """
        with self.opened_run(out if out is not None else self.default_run_dir(), resume, wait=wait,
                             on_wait=on_wait) as run:
            # Resuming counts the records; each must be of its image (the data set's label).
            labels = labels_lookup(self.data.y[: self.n_images].tolist())
            run.check_records(range(self.n_images), in_order=True, check=lambda r: _problem(
                record_problem("denoise", self.config, r, data_labels=labels)))
            return self._run(run)

    def _run(self, run: RunDirectory) -> dict[str, Any]:
        start_time = time.perf_counter()
        batch_wall = 0.0  # seconds this call spent on batches
        done = len(run.records)
        for batch, start in enumerate(range(0, self.n_images, self.batch_size)):
            if start < done:
                continue  # finished before a resume
            batch_started = time.perf_counter()
            records = self._batch_records(start, min(start + self.batch_size, self.n_images))
            seconds = time.perf_counter() - batch_started
            batch_wall += seconds
            run.append_batch(batch, [{**r, "batch_seconds": round(seconds, 3)} for r in records])
        records = run.records
        summary = DenoiseSummary(
            model=self.config["model"], dataset=self.data.name, n_images=self.n_images, seed=self.seed,
            psnr=[PsnrPoint(sigma=sigma,
                            psnr=sum(r["psnr"][k] for r in records) / len(records),
                            psnr_noisy=sum(r["psnr_noisy"][k] for r in records) / len(records))
                  for k, sigma in enumerate(self.sigmas)],
            # Every batch's time, whichever process ran it, plus this call's time outside them.
            seconds=round(sum({r["batch"]: r.get("batch_seconds", 0.0) for r in records}.values())
                          + time.perf_counter() - start_time - batch_wall, 3),
        ).to_json()
        run.write_summary(summary)
        return {**summary, "path": str(run.path)}

    def _batch_records(self, start: int, stop: int) -> list[dict[str, Any]]:
        clean = self.data.x[start:stop].to(self.model.device)
        # The noise of a batch depends only on the seed and its first index: a resumed run draws the same.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + start)
        noise = torch.randn((len(self.sigmas), *clean.shape), generator=generator).to(self.model.device)
        denoised_psnr, noisy_psnr = [], []
        for k, sigma in enumerate(self.sigmas):
            noisy = clean + sigma * noise[k]
            # Tweedie denoisers differentiate inside denoise(): autograd stays on; the graph is dropped per call.
            estimate = self.model.denoise(noisy, sigma).detach()
            denoised_psnr.append(per_image_psnr(estimate, clean).cpu())
            noisy_psnr.append(per_image_psnr(noisy, clean).cpu())
        return [DenoiseSample(index=i, label=int(self.data.y[i]),
                              psnr=[round(float(p[i - start]), 6) for p in denoised_psnr],
                              psnr_noisy=[round(float(p[i - start]), 6) for p in noisy_psnr]).to_json()
                for i in range(start, stop)]


def _problem(found: tuple[str, str] | None) -> str | None:
    return None if found is None else f"field {found[0]}: {found[1]}"


@shows_keywords(without=("shard",))
def prepare_denoising(model: JointModel | str, dataset: Any = "digits", *,
                      sigmas: Sequence[float] = (0.12, 0.25, 0.5), n_images: int | None = None,
                      batch_size: int | None = None, seed: int = 0, **options: Any) -> DenoiseJob:
    """Resolve model, weights and data (`robusteval.jobs.JobOptions`) into a prepared denoise job."""
    return DenoiseJob(resolve(model, JobOptions.of(dataset, options)), sigmas=sigmas, n_images=n_images,
                      batch_size=batch_size, seed=seed)


@shows_keywords(without=("shard",))
def evaluate_denoising(
    model: JointModel | str,
    dataset: Any = "digits",
    sigmas: Sequence[float] = (0.12, 0.25, 0.5),
    n_images: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = True,
    root: str | Path = "runs",
    **options: Any,
) -> dict[str, Any]:
    """Measure the model's denoiser on the first `n_images` test images at each σ; write a run; return its summary.

    `out` defaults to `root`/denoise-<model>-<dataset>-<config hash>; `options`
    are the `robusteval.jobs.JobOptions` of every evaluation.
    """
    job = prepare_denoising(model, dataset, sigmas=sigmas, n_images=n_images, batch_size=batch_size, seed=seed,
                            **options)
    return job.run(out if out is not None else job.default_run_dir(root), resume=resume)
