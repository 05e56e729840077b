"""The certification engine: reproducible per-image noise, batch-size invariance, resume, run files, errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import kstest
from torch import nn

import robusteval
from robusteval.core.interface import CapabilityError
from robusteval.data import load_dataset
from robusteval.runs import SAMPLES_FILE, SUMMARY_FILE, RunConfigMismatch
from robusteval.smoothing.engine import SmoothingSettings
from robusteval.smoothing.sampler import ESTIMATION, SELECTION, NoiseSource, Phase

SUMMARY_KEYS = {"kind", "model", "dataset", "mode", "sigma", "n0", "n", "alpha", "n_images", "certified_accuracy",
                "acr", "abstain_rate", "seconds"}
RECORD_KEYS = {"index", "label", "prediction", "abstain", "radius", "correct", "pA_lower", "count", "seconds"}


def linear_digits_model(seed: int = 0) -> robusteval.JointModel:
    """A random linear classifier of digits: cheap, and its noisy predictions spread over classes."""
    torch.manual_seed(seed)
    return robusteval.wrap(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), 10, (1, 8, 8), name="linear-digits")


class Interrupted(Exception):
    pass


class CountingModule(nn.Module):
    """Counts forward passes and raises Interrupted at pass `fail_at` (a stand-in for a kill)."""

    def __init__(self, inner: nn.Module, fail_at: int | None = None):
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.fail_at = fail_at

    def forward(self, x):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise Interrupted
        return self.inner(x)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def strip_timing(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "batch", "batch_records")} for r in records]


def certify_linear(data, **kwargs):
    options = dict(sigma=0.5, n0=20, n=300, alpha=0.01, n_images=6, batch_size=256, device="cpu", compile=False)
    options.update(kwargs)
    return robusteval.certify(options.pop("model", linear_digits_model()), data, **options)


def test_same_seed_same_records_and_batch_size_does_not_change_counts(digits):
    reference = certify_linear(digits)
    assert strip_timing(certify_linear(digits).records) == strip_timing(reference.records)
    # Passes of 1, 7 or 5000 pairs cut the stream elsewhere (mid-block, across images): same counts.
    for batch_size in (1, 7, 333, 5000):
        assert strip_timing(certify_linear(digits, batch_size=batch_size).records) == strip_timing(reference.records)
    # The counts carry information: the classes are spread and another seed moves them.
    counts = [r["count"] for r in reference.records]
    assert len({r["top_class"] for r in reference.records}) > 1 and min(counts) < 300
    other = certify_linear(digits, seed=1)
    assert [r["count"] for r in other.records] != counts


def test_noise_belongs_to_the_image_not_to_its_position(digits):
    full = certify_linear(digits, n_images=6)
    shifted = certify_linear(digits, skip=3, n_images=3)
    assert [r["index"] for r in shifted.records] == [3, 4, 5]
    assert strip_timing(shifted.records) == strip_timing(full.records[3:])


def test_noise_stream_is_standard_normal_blockwise_and_phases_are_independent():
    source = NoiseSource(seed=3, input_shape=(1, 4, 4), device=torch.device("cpu"), dtype=torch.float32)
    phase = Phase(ESTIMATION, 2500)
    whole = torch.empty(2500, 1, 4, 4)
    source.write(whole, 7, phase, 0, 2500)
    pieces = torch.empty(2500, 1, 4, 4)
    for start, stop in ((0, 3), (3, 999), (999, 1001), (1001, 2500)):
        source.write(pieces[start:stop], 7, phase, start, stop)
    assert torch.equal(whole, pieces)
    values = whole.flatten().double().numpy()
    assert kstest(values, "norm").pvalue > 1e-3
    # Selection and estimation draws of one image, and the draws of two images, are unrelated streams.
    selection = torch.empty(1000, 1, 4, 4)
    source.write(selection, 7, Phase(SELECTION, 1000), 0, 1000)
    other_image = torch.empty(1000, 1, 4, 4)
    source.write(other_image, 8, phase, 0, 1000)
    for stream in (selection, other_image):
        correlation = np.corrcoef(stream.flatten().numpy(), whole[:1000].flatten().numpy())[0, 1]
        assert abs(correlation) < 0.04  # 5 standard errors for 16,000 pairs


def test_part_used_blocks_of_many_images_are_drawn_once(monkeypatch):
    """The sequential sampler leaves a block part-used for every image of its pack; each is drawn once, not once
    per slice, and the values are those of one whole write."""
    source = NoiseSource(seed=3, input_shape=(1, 4, 4), device=torch.device("cpu"), dtype=torch.float32)
    phase = Phase(ESTIMATION, 1000)
    fills = []
    original = source._fill
    monkeypatch.setattr(source, "_fill", lambda out, *key: (fills.append(key), original(out, *key)))
    images = range(12)  # more than a pass leaves part-used in CERTIFY's sampler
    slices = {i: torch.empty(1000, 1, 4, 4) for i in images}
    for start in range(0, 1000, 40):  # rounds of 40 draws, the images interleaved as in a pass
        for i in images:
            source.write(slices[i][start:start + 40], i, phase, start, start + 40)
    assert sorted(fills) == sorted((i, ESTIMATION, 0) for i in images)
    assert not source._partial  # a block goes once its last rows are taken
    for i in images:
        whole = torch.empty(1000, 1, 4, 4)
        source.write(whole, i, phase, 0, 1000)
        assert torch.equal(slices[i], whole)


def test_resume_after_a_kill_continues_from_the_last_complete_batch(digits, tmp_path):
    options = dict(n_images=8, batch_size=100, n0=20, n=180)  # 2 passes per image, one image per record batch
    uninterrupted = certify_linear(digits, out=tmp_path / "full", **options)

    inner = linear_digits_model().module
    killed = robusteval.wrap(CountingModule(inner, fail_at=7), 10, (1, 8, 8), name="linear-digits")
    with pytest.raises(Interrupted):
        certify_linear(digits, model=killed, out=tmp_path / "run", **options)
    kept = [json.loads(line) for line in (tmp_path / "run" / SAMPLES_FILE).read_text().splitlines()]
    assert [r["index"] for r in kept] == [0, 1, 2]  # passes 1-6 finished images 0-2
    assert not (tmp_path / "run" / SUMMARY_FILE).exists()

    # A torn write of the next batch is dropped on resume.
    with open(tmp_path / "run" / SAMPLES_FILE, "a") as handle:
        handle.write('{"index": 3, "label": 1, "predic')
    counting = CountingModule(inner)
    resumed = certify_linear(digits, model=robusteval.wrap(counting, 10, (1, 8, 8), name="linear-digits"),
                             out=tmp_path / "run", **options)
    assert counting.calls == 2 * 5  # only images 3-7 were computed again
    assert strip_timing(resumed.records) == strip_timing(uninterrupted.records)
    on_disk = [json.loads(line) for line in (tmp_path / "run" / SAMPLES_FILE).read_text().splitlines()]
    assert strip_timing(on_disk) == strip_timing(uninterrupted.records)
    summary = json.loads((tmp_path / "run" / SUMMARY_FILE).read_text())
    assert {k: v for k, v in summary.items() if k != "seconds"} == {
        k: v for k, v in uninterrupted.summary.items() if k != "seconds"}

    with pytest.raises(RunConfigMismatch):
        certify_linear(digits, out=tmp_path / "run", **{**options, "n": 200})


def test_records_and_summary_have_the_documented_keys(digits):
    result = certify_linear(digits, n_images=5)
    assert SUMMARY_KEYS <= set(result.summary)
    assert result.summary["kind"] == "certify" and result.summary["n_images"] == 5
    for record in result.records:
        assert RECORD_KEYS <= set(record)
        assert record["abstain"] == (record["prediction"] is None)
        assert record["correct"] == (record["prediction"] == record["label"])
        assert (record["radius"] > 0) == (not record["abstain"])
    radii = [p["radius"] for p in result.summary["certified_accuracy"]]
    assert radii == [0.25 * k for k in range(len(radii))]
    assert radii[-1] <= max(r["radius"] for r in result.records) < radii[-1] + 0.25

    predicted = robusteval.predict(linear_digits_model(), digits, sigma=0.5, n=300, alpha=0.01, n_images=5,
                                   device="cpu", compile=False)
    assert predicted.summary["kind"] == "predict"
    for record in predicted.records:
        assert record["count"] + record["runner_up_count"] <= 300
        assert record["abstain"] == (record["p_value"] > 0.01)


def test_clear_errors(digits):
    with pytest.raises(CapabilityError, match="denoise"):
        certify_linear(digits, mode="denoised")
    with pytest.raises(ValueError, match="sigma"):
        certify_linear(digits, sigma=0.0)
    with pytest.raises(ValueError, match="n0"):
        certify_linear(digits, n0=0)
    with pytest.raises(ValueError, match="n_images"):
        certify_linear(digits, n_images=501)
    with pytest.raises(ValueError, match="unknown smoothing mode"):
        SmoothingSettings("certify", sigma=0.25, n=10, alpha=0.01, n0=1, mode="denoise-then-classify")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        certify_linear((digits.x[:4] * 2, digits.y[:4]), n_images=4)
    with pytest.raises(ValueError, match="labels"):
        certify_linear((digits.x[:4], digits.y[:4] + 10), n_images=4)


def test_auto_compile_decides_from_timed_eager_passes(caplog):
    from robusteval.smoothing import sampler

    threshold = sampler.compile_payoff_seconds("cpu")
    timed = sampler.TIMED_EAGER_PASSES
    now = [0.0]
    x = torch.zeros(4, 1, 2, 2)

    def runner_with(eager_seconds: list[float], compiled_seconds: float, warmup_seconds: float = 20.0):
        """A runner on a fake clock: eager pass k takes eager_seconds[k] (the last value repeats)."""
        built, eager_calls = [], []

        def eager(noisy):
            now[0] += eager_seconds[min(len(eager_calls), len(eager_seconds) - 1)]
            eager_calls.append(1)
            return torch.zeros(noisy.shape[0], dtype=torch.long)

        def make_compiled():
            built.append(True)
            calls = []

            def compiled(noisy):
                now[0] += compiled_seconds + (warmup_seconds if not calls else 0.0)
                calls.append(1)
                return torch.ones(noisy.shape[0], dtype=torch.long)

            return compiled

        return sampler.BaseClassifierRunner(eager, make_compiled, None, clock=lambda: now[0]), built

    # Eager time still to come well above the threshold: a warm-up and `timed` timed passes, then compiled.
    passes_left = int(2 * threshold / 0.1)
    runner, built = runner_with([5.0, 0.1], 0.05)  # the slow first (warm-up) pass is not counted
    outputs = [int(runner(x, passes_left)[0]) for _ in range(timed + 6)]
    assert outputs == [0] * (timed + 1) + [1] * 5 and runner.compiled and built == [True]
    assert runner.timing["eager_pass_seconds"] == pytest.approx(0.1)
    assert runner.timing["projected_eager_seconds"] == pytest.approx(0.1 * passes_left)
    assert runner.timing["compile_warmup_seconds"] == pytest.approx(20.05)
    assert runner.timing["compiled_pass_seconds"] == pytest.approx(0.05)
    # Below the threshold it stays eager and never builds the compiled classifier ...
    runner, built = runner_with([0.1], 0.05)
    assert [int(runner(x, int(0.5 * threshold / 0.1))[0]) for _ in range(timed + 6)] == [0] * (timed + 6)
    assert not built and not runner.compiled
    # ... even when one timed pass is slow: the median decides, not a single pass.
    runner, built = runner_with([0.1, 0.1, 50.0, 0.1], 0.05)
    assert [int(runner(x, int(0.5 * threshold / 0.1))[0]) for _ in range(timed + 3)] == [0] * (timed + 3)
    assert not built and runner.timing["eager_pass_seconds"] == pytest.approx(0.1)
    # A compiled classifier that is no faster than eager is dropped once timed.
    runner, built = runner_with([0.1], 0.2)
    outputs = [int(runner(x, passes_left)[0]) for _ in range(2 * timed + 4)]
    assert outputs == [0] * (timed + 1) + [1] * (timed + 1) + [0] * 2 and not runner.compiled and built == [True]

    # Explicit choices are obeyed from the first pass.
    def zeros(noisy):
        return torch.zeros(noisy.shape[0], dtype=torch.long)

    def ones(noisy):
        return torch.ones(noisy.shape[0], dtype=torch.long)

    assert int(sampler.BaseClassifierRunner(zeros, lambda: ones, True)(x, 0)[0]) == 1
    assert int(sampler.BaseClassifierRunner(zeros, lambda: ones, False)(x, 10**6)[0]) == 0

    # A compiler that fails (no C++ toolchain, say): auto goes on eagerly and says so; compile=True raises.
    def broken(noisy):
        raise RuntimeError("C++ compile failed\nlong log")

    def slow_zeros(noisy):
        now[0] += 1.0
        return zeros(noisy)

    runner = sampler.BaseClassifierRunner(slow_zeros, lambda: broken, None, clock=lambda: now[0])
    with caplog.at_level("WARNING", logger=sampler.__name__):
        outputs = [int(runner(x, 10**6)[0]) for _ in range(timed + 4)]
    assert outputs == [0] * (timed + 4) and not runner.compiled and runner.policy is False
    assert runner.timing["projected_eager_seconds"] > threshold  # it did try to compile
    assert "compiling the base classifier failed (RuntimeError: C++ compile failed); going on eagerly" in caplog.text
    with pytest.raises(RuntimeError, match="C\\+\\+ compile failed"):
        sampler.BaseClassifierRunner(zeros, lambda: broken, True)(x, 0)


def test_the_compile_payoff_is_per_device_kind():
    from robusteval.smoothing import sampler

    # The CPU threshold is twice the prior 12 s warm-up (compiling's break-even); a GPU compile takes longer.
    assert sampler.compile_payoff_seconds("cpu") == pytest.approx(24.0)
    assert sampler.compile_payoff_seconds("cuda") == pytest.approx(60.0)
    assert sampler.compile_payoff_seconds("mps") == sampler.compile_payoff_seconds("cpu")
    # The runner decides with its device's threshold: 50 s of eager passes left compiles on a CPU only.
    now = [0.0]

    def eager(noisy):
        now[0] += 1.0
        return torch.zeros(noisy.shape[0], dtype=torch.long)

    x = torch.zeros(4, 1, 2, 2)
    for kind, compiles in (("cpu", True), ("cuda", False)):
        built = []
        runner = sampler.BaseClassifierRunner(eager, lambda: built.append(1) or eager, None, clock=lambda: now[0],
                                              device_type=kind)
        for _ in range(sampler.TIMED_EAGER_PASSES + 1):
            runner(x, 50)
        assert bool(built) == compiles, kind


def test_compiled_base_classifier_counts_like_the_eager_one(digits):
    # The compiled path (inductor, with frozen weights) must count what eager PyTorch counts; argmax ties
    # between classes are the only way they could differ, and the shipped CNN's logits do not tie.
    model = robusteval.create_model("gaussian", device="cpu")
    options = dict(model=model, sigma=0.25, n0=20, n=200, n_images=3, batch_size=128)
    eager = certify_linear(digits, **options)
    compiled = certify_linear(digits, compile=True, **options)
    assert compiled.summary["compile"] is True and eager.summary["compile"] is False
    assert [r["count"] for r in compiled.records] == [r["count"] for r in eager.records]
    assert strip_timing(compiled.records) == strip_timing(eager.records)


def test_an_eager_certify_call_does_not_import_the_compiler():
    # torch.use_deterministic_algorithms imports torch._inductor (about 2 s, most of a short call's time):
    # leaving the deterministic switch as it is must not call it.
    script = ("import sys, torch, robusteval\n"
              "model = robusteval.create_model('standard', dataset='digits')\n"
              "robusteval.certify(model, 'digits', sigma=0.25, n0=10, n=20, n_images=1, compile=False)\n"
              "print('torch._inductor' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False", done.stdout + done.stderr
