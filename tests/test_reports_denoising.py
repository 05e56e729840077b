"""The `denoise` run kind: known answers for trivial denoisers, resume, and the report reading it back."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from robusteval.core.interface import CapabilityError, JointModel
from robusteval.data import load_dataset
from robusteval.generative.denoising import evaluate_denoising
from robusteval.reports.loading import load_run


class _Denoiser(JointModel):
    """A 'denoiser' with a known answer: identity, or the constant grey image."""

    num_classes = 10
    input_shape = (1, 8, 8)
    capabilities = frozenset({"logits", "denoise"})

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.name = f"{kind}-denoiser"
        self.rows = 0  # images denoised so far

    def _logits(self, x, sigma):
        return torch.zeros(x.shape[0], self.num_classes)

    def _denoise(self, x, sigma):
        self.rows += x.shape[0]
        return x.clone() if self.kind == "identity" else torch.full_like(x, 0.5)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "test")


def test_identity_denoiser_scores_the_noisy_input_and_psnr_follows_sigma(digits, tmp_path):
    summary = evaluate_denoising(_Denoiser("identity"), digits, sigmas=(0.1, 0.5), n_images=200, batch_size=64,
                                 out=tmp_path / "run")
    for point in summary["psnr"]:
        assert point["psnr"] == point["psnr_noisy"]
        # Mean per-image PSNR of x + σn over 64 pixels: −20·log10 σ plus a small positive bias.
        assert point["psnr_noisy"] == pytest.approx(-20 * math.log10(point["sigma"]), abs=0.3)


def test_constant_denoiser_has_the_psnr_of_the_grey_image(digits, tmp_path):
    summary = evaluate_denoising(_Denoiser("grey"), digits, sigmas=(0.25,), n_images=100, out=tmp_path / "run")
    # By hand, in float64: per image 10·log10(1 / mean((0.5 − x)²)), then the mean over images.
    clean = digits.x[:100].double().numpy().reshape(100, -1)
    expected = float(np.mean(10 * np.log10(1 / np.mean((0.5 - clean) ** 2, axis=1))))
    assert summary["psnr"][0]["psnr"] == pytest.approx(expected, abs=1e-5)


def test_run_directory_resumes_to_the_same_summary_and_loads_as_a_denoise_run(digits, tmp_path):
    model = _Denoiser("identity")
    whole = evaluate_denoising(model, digits, n_images=90, batch_size=40, seed=3, out=tmp_path / "whole")
    path = tmp_path / "cut"
    evaluate_denoising(model, digits, n_images=90, batch_size=40, seed=3, out=path)
    # Simulate a kill after the first batch: keep its 40 records, drop the summary.
    lines = (path / "samples.jsonl").read_text().splitlines()[:40]
    (path / "samples.jsonl").write_text("\n".join(lines) + "\n")
    (path / "summary.json").unlink()
    model.rows = 0
    resumed = evaluate_denoising(model, digits, n_images=90, batch_size=40, seed=3, out=path)
    assert resumed["psnr"] == whole["psnr"]
    assert model.rows == 50 * 3  # only the 50 images after the first batch, at each of the 3 σ
    run = load_run(path)
    assert run.kind == "denoise" and run.model == "identity-denoiser" and len(run.records) == 90
    config = json.loads((path / "config.json").read_text())
    assert config["kind"] == "denoise" and config["sigmas"] == [0.12, 0.25, 0.5] and "provenance" in config


def test_errors_are_clear(digits, tmp_path):
    model = _Denoiser("identity")
    model.capabilities = frozenset({"logits"})
    with pytest.raises(CapabilityError):
        evaluate_denoising(model, digits, out=tmp_path / "a")
    with pytest.raises(ValueError, match="sigmas must be positive"):
        evaluate_denoising(_Denoiser("identity"), digits, sigmas=(0.0,), out=tmp_path / "b")
    with pytest.raises(ValueError, match="n_images must be in"):
        evaluate_denoising(_Denoiser("identity"), digits, n_images=10_000, out=tmp_path / "c")
