"""Denoising runs: how well a model's own denoiser recovers x from x + σ·n (PSNR per σ).

A `denoise` run directory follows the same layout as attack and certify runs
(robusteval.runs), so reports read it like the others:

- config.json: kind "denoise", model, dataset, sigmas, n_images, seed,
  batch_size, plus provenance;
- samples.jsonl: per image {index, label, psnr: [one per σ], psnr_noisy: [one per σ], batch_seconds};
- summary.json: kind "denoise", model, dataset, n_images, seed, seconds and
  psnr: [{sigma, psnr, psnr_noisy}], the mean over images of the per-image
  PSNR (dB, peak 1) of the denoised image and of the noisy input.

The noise of a batch depends only on the seed and the batch's first index, so
a resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from robusteval.data import ImageDataset
from robusteval.interface import CapabilityError, JointModel
from robusteval.job_checks import check_data_fits_model
from robusteval.runs import RunDirectory, default_run_dir


def per_image_psnr(estimate: Tensor, clean: Tensor) -> Tensor:
    """PSNR in dB of each image (peak 1 for [0, 1] images), as a (B,) tensor."""
    if estimate.shape != clean.shape:
        raise ValueError(f"estimate and clean must have one shape, got {tuple(estimate.shape)} and "
                         f"{tuple(clean.shape)}")
    mse = (estimate - clean).flatten(1).pow(2).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)


def evaluate_denoising(
    model: JointModel,
    data: ImageDataset,
    sigmas: Sequence[float] = (0.12, 0.25, 0.5),
    n_images: int | None = None,
    batch_size: int = 100,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = True,
    root: str | Path = "runs",
) -> dict[str, Any]:
    """Measure the model's denoiser on the first `n_images` test images at each σ; write a run; return its summary."""
    if "denoise" not in model.capabilities:
        raise CapabilityError(getattr(model, "name", type(model).__name__), "denoise", model.capabilities)
    sigmas = [float(s) for s in sigmas]
    if not sigmas or any(s <= 0 for s in sigmas):
        raise ValueError(f"sigmas must be positive noise levels, got {sigmas}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n_images = len(data) if n_images is None else int(n_images)
    if not 0 < n_images <= len(data):
        raise ValueError(f"n_images must be in [1, {len(data)}], got {n_images}")
    name = getattr(model, "name", type(model).__name__)
    # Only the image shape: labels play no part in denoising.
    check_data_fits_model(name, model.input_shape, model.num_classes, data.x[:n_images], data.y[:0],
                          data_name=f"data set '{data.name}'")
    config = {"kind": "denoise", "model": name, "dataset": data.name, "sigmas": sigmas, "n_images": n_images,
              "seed": seed, "batch_size": batch_size}
    path = Path(out) if out is not None else default_run_dir(config, ("denoise", name, data.name), root=root)
    with RunDirectory(path, config, resume=resume) as run:
        run.check_records(range(n_images), in_order=True)  # resuming counts the records
        return _denoise_into(run, model, data, sigmas, n_images, batch_size, seed, name)


def _denoise_into(run: RunDirectory, model: JointModel, data: ImageDataset, sigmas: list[float], n_images: int,
                  batch_size: int, seed: int, name: str) -> dict[str, Any]:
    start_time = time.perf_counter()
    batch_wall = 0.0
    device = model.device
    done = len(run.records)
    for batch, start in enumerate(range(0, n_images, batch_size)):
        if start < done:
            continue  # finished before a resume
        stop = min(start + batch_size, n_images)
        batch_started = time.perf_counter()
        clean = data.x[start:stop].to(device)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
        noise = torch.randn((len(sigmas), *clean.shape), generator=generator).to(device)
        denoised_psnr, noisy_psnr = [], []
        for k, sigma in enumerate(sigmas):
            noisy = clean + sigma * noise[k]
            # Tweedie denoisers differentiate inside denoise(): autograd stays on; the graph is dropped per call.
            estimate = model.denoise(noisy, sigma).detach()
            denoised_psnr.append(per_image_psnr(estimate, clean).cpu())
            noisy_psnr.append(per_image_psnr(noisy, clean).cpu())
        records = [
            {"index": i, "label": int(data.y[i]),
             "psnr": [round(float(p[i - start]), 6) for p in denoised_psnr],
             "psnr_noisy": [round(float(p[i - start]), 6) for p in noisy_psnr],
             "batch_seconds": round(time.perf_counter() - batch_started, 3)}
            for i in range(start, stop)
        ]
        batch_wall += time.perf_counter() - batch_started
        run.append_batch(batch, records)
    records = run.records
    summary = {
        "kind": "denoise", "model": name, "dataset": data.name, "n_images": n_images, "seed": seed,
        "psnr": [
            {"sigma": sigma,
             "psnr": sum(r["psnr"][k] for r in records) / len(records),
             "psnr_noisy": sum(r["psnr_noisy"][k] for r in records) / len(records)}
            for k, sigma in enumerate(sigmas)
        ],
        # Every batch's time, whichever process ran it, plus this call's time outside them.
        "seconds": round(sum({r["batch"]: r.get("batch_seconds", 0.0) for r in records}.values())
                         + time.perf_counter() - start_time - batch_wall, 3),
    }
    run.write_summary(summary)
    return {**summary, "path": str(run.path)}
