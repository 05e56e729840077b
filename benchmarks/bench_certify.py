"""Benchmark: robusteval certify vs a per-image Cohen loop vs ART's randomized smoothing certify.

On the same model, the same images and the same settings (n0 = 100,
n = 10,000, α = 0.001 by default), in one process:

- robusteval: `robusteval.certify` (draws of many images packed into static-shape
  passes, compiled unless --no-compile; one warm-up image first, so compiling is
  reported apart from the steady state);
- per-image loop: Cohen et al.'s algorithm one image at a time, noise in
  batches of --batch-size draws (1,000 by default), eager PyTorch under
  inference_mode, counts on the host, as the reference implementation does;
- ART: `PyTorchRandomizedSmoothing.certify` of adversarial-robustness-toolbox.

Models: `digits`, the 3-conv CNN of the `gaussian` baseline (shipped weights)
on the digits test images; `cdn`, the shipped Classification–Denoising
Network on the same images; `resnet18`, torchvision's ResNet-18 with random
weights on random 3×32×32 images. Printed per model: images/s and noise
samples/s of each method, their ratios, and the pure forward throughput of the
model at the same batch size (eager, and compiled as the engine compiles), the ceiling of any
certifier since CERTIFY costs n0 + n forward passes per image.

Whole call (--whole-call, on by default): `robusteval.certify` timed as a
user runs it, one call with the automatic compile decision and its warm-up
included, in a fresh Python process with empty inductor caches (a first run),
then once more with the caches it left (any later run), against the
per-image loop on the same images (timed earlier in this process: on a
shared machine the speed can drift between the two by 10-25%).

Sequential (--sequential-radii 0.25,0.5,0.75): the sequential method with
n_max = n on the same images, against CERTIFY: forward passes in all, wall
time, and certified accuracy at each grid radius with 95% Clopper–Pearson
intervals for both.

    python benchmarks/bench_certify.py                   # the full benchmark
    python benchmarks/bench_certify.py --n-images 5 --resnet-images 1   # a quick check
    python benchmarks/bench_certify.py --models digits,cdn --n-images 500 --sequential-radii 0.25,0.5,0.75 --skip-art
    python benchmarks/bench_certify.py --models digits,cdn --n-images 500 --simulate-designs 2000   # designs only
    python benchmarks/bench_certify.py --models digits,cdn --efficiency 50,300   # forward-only / whole call
    python benchmarks/bench_certify.py --power-grid 4000   # sequential designs vs CERTIFY near the thresholds
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import click
import numpy as np
import torch
from torch import Tensor, nn

import robusteval
from robusteval.core.devices import resolve_device
from robusteval.core.interface import JointModel, trusted_inputs
from robusteval.smoothing.decisions import certify_decision
from robusteval.smoothing.engine import COMPILE_OPTIONS


@dataclass
class Timing:
    method: str
    images: int
    seconds: float
    samples_per_image: int

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds

    @property
    def samples_per_second(self) -> float:
        return self.images * self.samples_per_image / self.seconds


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def forward_throughput(classify: Callable[[Tensor], Tensor], shape: tuple[int, ...], batch: int,
                       device: torch.device, min_seconds: float = 3.0) -> float:
    """Samples/s of classify on one fixed (batch, *shape) input, after two warm-up passes."""
    x = torch.rand((batch, *shape), device=device)
    with torch.inference_mode(), trusted_inputs():
        for _ in range(2):
            classify(x)
        synchronize(device)
        passes, started = 0, time.perf_counter()
        while passes < 3 or time.perf_counter() - started < min_seconds:
            classify(x)
            passes += 1
        synchronize(device)
        return passes * batch / (time.perf_counter() - started)


def per_image_cohen(model: JointModel, x: Tensor, sigma: float, n0: int, n: int, alpha: float,
                    batch: int) -> list[tuple[int | None, float]]:
    """Cohen et al.'s CERTIFY, one image at a time, noise in batches of `batch` draws, eager."""
    device = model.device

    def counts_of(image: Tensor, draws: int) -> np.ndarray:
        counts = np.zeros(model.num_classes, dtype=np.int64)
        remaining = draws
        while remaining:
            size = min(batch, remaining)
            remaining -= size
            repeated = image.repeat((size, 1, 1, 1))
            noisy = repeated + torch.randn_like(repeated) * sigma
            predictions = model.logits(noisy, sigma).argmax(1)
            counts += np.bincount(predictions.cpu().numpy(), minlength=model.num_classes)
        return counts

    results = []
    with torch.inference_mode(), trusted_inputs():
        for image in x:
            image = image.to(device)
            selection = counts_of(image, n0)
            estimation = counts_of(image, n)
            cert = certify_decision(selection, estimation, sigma, alpha)
            results.append((cert.prediction, cert.radius))
    return results


class NoisyLogits(nn.Module):
    """What ART sees: a plain module returning the model's logits at noise level σ."""

    def __init__(self, model: JointModel, sigma: float):
        super().__init__()
        self.model = model
        self.sigma = sigma

    def forward(self, x: Tensor) -> Tensor:
        return self.model.logits(x, self.sigma)


def art_certify(model: JointModel, x: Tensor, sigma: float, n0: int, n: int, alpha: float,
                batch: int) -> list[tuple[int | None, float]]:
    from art.estimators.certification.randomized_smoothing import (
        PyTorchRandomizedSmoothing,
    )

    smoothed = PyTorchRandomizedSmoothing(
        model=NoisyLogits(model, sigma), loss=nn.CrossEntropyLoss(), input_shape=model.input_shape,
        nb_classes=model.num_classes, sample_size=n0, scale=sigma, alpha=alpha,
        device_type="cpu" if model.device.type == "cpu" else "gpu",
    )
    with trusted_inputs():
        predictions, radii = smoothed.certify(x.numpy(), n=n, batch_size=batch)
    return [(None if int(p) < 0 else int(p), float(r)) for p, r in zip(predictions, radii)]


def timed(method: str, run: Callable[[], object], images: int, samples: int, device: torch.device):
    synchronize(device)
    started = time.perf_counter()
    out = run()
    synchronize(device)
    return Timing(method, images, time.perf_counter() - started, samples), out


def build_model(name: str, n_images: int, resnet_images: int, device: torch.device
                ) -> tuple[str, JointModel, Tensor, Tensor]:
    """The benchmark's model and images by name (the same in this process and in a whole-call child)."""
    if name in ("digits", "cdn"):
        registered = "gaussian" if name == "digits" else "cdn"
        model = robusteval.create_model(registered, dataset="digits", device=device)
        data = robusteval.load_dataset("digits")
        label = "digits 3-conv CNN (gaussian)" if name == "digits" else "digits CDN (cdn)"
        return label, model, data.x[:n_images], data.y[:n_images]
    if name == "resnet18":
        from torchvision.models import resnet18

        torch.manual_seed(0)
        network = resnet18(num_classes=10).eval()
        model = robusteval.wrap(network, 10, (3, 32, 32), name="resnet18-random").to(device)
        generator = torch.Generator().manual_seed(0)
        x = torch.rand((resnet_images, 3, 32, 32), generator=generator)
        y = torch.randint(0, 10, (resnet_images,), generator=generator)
        return "ResNet-18 3x32x32 (random weights)", model, x, y
    raise click.BadParameter(f"unknown model {name!r}; use digits, cdn and/or resnet18", param_hint="--models")


def whole_call(name: str, sigma: float, args: dict, cold_repeats: int = 1) -> dict:
    """One `robusteval.certify` call (auto compile) timed in a fresh process with empty inductor caches (a first
    run on a machine), `cold_repeats` times (each with caches of its own), then once more with the caches the last
    one left (every later run). Each child also measures the model's eager forward rate after its call, so its
    forward-only time comes from the same process and minute as its whole call (this machine drifts by 10-25%
    between minutes)."""
    child = {"name": name, "sigma": sigma, "forward_rate": True, **{k: args[k] for k in (
        "n_images", "resnet_images", "n0", "n", "alpha", "batch_size", "device", "threads")}}

    def run_child(cache: str) -> dict:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        out = subprocess.run([sys.executable, __file__, "--whole-call-child", json.dumps(child)], env=env,
                             check=True, capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    cold = []
    for _ in range(cold_repeats):
        with tempfile.TemporaryDirectory() as cache:
            cold.append(run_child(cache))
            if len(cold) == cold_repeats:
                warm = run_child(cache)
    return {**cold[-1], "cold_runs": cold, "warm_caches": warm}


def run_whole_call_child(spec: dict) -> None:
    if spec["threads"] is not None:
        torch.set_num_threads(spec["threads"])
    _, model, x, y = build_model(spec["name"], spec["n_images"], spec["resnet_images"],
                                 resolve_device(spec["device"]))
    synchronize(model.device)
    started = time.perf_counter()
    result = robusteval.certify(model, (x, y), sigma=spec["sigma"], n0=spec["n0"], n=spec["n"], alpha=spec["alpha"],
                                batch_size=spec["batch_size"], compile=None, device=model.device)
    synchronize(model.device)
    seconds = time.perf_counter() - started
    figures = {"seconds": seconds, "compile": result.summary["compile"]}
    if spec.get("forward_rate"):
        step = lambda images: model.logits(images, spec["sigma"]).argmax(1)  # noqa: E731
        figures["forward_samples_per_second"] = forward_throughput(step, model.input_shape, spec["batch_size"],
                                                                   model.device)
    click.echo(json.dumps(figures))


def interval(fraction: float, total: int) -> tuple[float, float]:
    """95% Clopper–Pearson interval of a fraction of `total` images."""
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(round(fraction * total), total, alpha=0.05, method="beta")
    return float(low), float(high)


def compare_sequential(model: JointModel, x: Tensor, y: Tensor, sigma: float, radii: list[float], args: dict,
                       cohen: Timing, cohen_result) -> dict:
    """Sequential certification with n_max = n against CERTIFY's run on the same images."""
    device = model.device
    n0, n = args["n0"], args["n"]
    timing, result = timed("sequential", lambda: robusteval.certify(
        model, (x, y), sigma=sigma, n0=n0, alpha=args["alpha"], batch_size=args["batch_size"],
        compile=args["compile"], device=device, method="sequential", radii=radii, n_max=n), len(x), n0 + n, device)
    summary = result.summary
    cohen_passes = len(x) * (n0 + n)
    draws = summary["draws_per_image"]
    click.echo(f"sequential (n_max {n}, radii {radii}): {timing.seconds:.1f} s ({cohen.seconds / timing.seconds:.2f}x "
               f"faster than CERTIFY), {summary['forward_passes']} forward passes against {cohen_passes} "
               f"({cohen_passes / summary['forward_passes']:.2f}x fewer); estimation draws per image mean "
               f"{draws['mean']:.0f}, median {draws['median']:.0f}, max {draws['max']}")
    total = len(x)
    rows = []
    for point in summary["grid_certified_accuracy"]:
        radius = point["radius"]
        ours = point["accuracy"]
        # As the summary's curve counts it: correct (so not abstaining) with a radius of at least r.
        theirs = sum(bool(r["correct"]) and r["radius"] >= radius for r in cohen_result.records) / total
        rows.append({"radius": radius, "sequential": ours, "sequential_95": interval(ours, total),
                     "certify": theirs, "certify_95": interval(theirs, total)})
        low, high = rows[-1]["sequential_95"]
        c_low, c_high = rows[-1]["certify_95"]
        click.echo(f"  r = {radius:g}: sequential {ours:.3f} [{low:.3f}, {high:.3f}], CERTIFY {theirs:.3f} "
                   f"[{c_low:.3f}, {c_high:.3f}]")
    return {"seconds": timing.seconds, "certify_seconds": cohen.seconds, "forward_passes": summary["forward_passes"],
            "certify_forward_passes": cohen_passes, "draws_per_image": draws, "certified_accuracy": rows}


def power_grid(sigma: float, alpha: float, n_max: int, streams: int, radii: list[float],
               rates: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)) -> list[dict]:
    """Certification rate of each sequential design against CERTIFY at n = n_max on shared Bernoulli streams, at
    the p_A where CERTIFY certifies each of `rates` (the band the power goal covers)."""
    from scipy.optimize import brentq
    from scipy.stats import binom, norm

    from robusteval.smoothing.sequential import SequentialTest

    rows = []
    for radius in radii:
        threshold = norm.cdf(radius / sigma)
        failures = np.arange(n_max + 1)
        allowed = int(failures[binom.cdf(failures, n_max, 1 - threshold) <= alpha].max())
        tests = {design: SequentialTest(sigma, [radius], alpha, n_max, design=design)
                 for design in ("spending", "betting")}
        for rate in rates:
            p = brentq(lambda q, a=allowed, r=rate: binom.cdf(a, n_max, 1 - q) - r, 0.5, 1 - 1e-12)
            rng = np.random.default_rng(int(1e6 * p))
            steps = np.diff(np.concatenate([[0], tests["spending"].looks]))
            cumulative = np.cumsum(rng.binomial(np.broadcast_to(steps, (streams, steps.size)), 1 - p), axis=1)
            row = {"radius": radius, "pA": p, "certify": float((cumulative[:, -1] <= allowed).mean())}
            for design, test in tests.items():
                state = test.start(streams)
                for look, draws in enumerate(test.looks):
                    active = np.flatnonzero(~state.done)
                    if active.size:
                        test.observe(state, active, draws - cumulative[active, look])
                row[design] = float(state.certified[:, 1].mean())
                row[f"{design}_draws"] = float(test.draws_done(state).mean())
            rows.append(row)
            click.echo(f"  r = {radius:g}, p_A = {p:.5f}: CERTIFY {row['certify']:.3f}, spending {row['spending']:.3f} "
                       f"({row['spending'] / row['certify']:.3f}x, mean draws {row['spending_draws']:.0f}), betting "
                       f"{row['betting']:.3f} ({row['betting'] / row['certify']:.3f}x, {row['betting_draws']:.0f})")
    return rows


def simulate_designs(counts: np.ndarray, correct: np.ndarray, n_pilot: int, sigma: float, radii: list[float],
                     alpha: float, n_max: int, n0: int, replicates: int = 3, seed: int = 0) -> list[dict]:
    """Forward passes and certified accuracy of sequential designs against CERTIFY at n = n_max, simulated.

    Each image's p_A is drawn from the posterior Beta(k + 1, n_pilot − k + 1) of its pilot count k (CERTIFY's
    count of ĉ among n_pilot draws), `replicates` times; every design and CERTIFY see the same Bernoulli stream
    (binomial increments between the looks, which all designs share).
    """
    from scipy.stats import binom

    from robusteval.smoothing.sequential import SequentialTest

    rng = np.random.default_rng(seed)
    p = rng.beta(np.tile(counts, replicates) + 1, n_pilot - np.tile(counts, replicates) + 1)
    right = np.tile(correct, replicates)
    designs = {"spending (5% of alpha early)": {"design": "spending"},
               "spending, 10% early": {"design": "spending", "sequence_share": 0.1},
               "spending, 25% early": {"design": "spending", "sequence_share": 0.25},
               "betting (all of alpha early)": {"design": "betting"}}
    tests = {name: SequentialTest(sigma, radii, alpha, n_max, **options) for name, options in designs.items()}
    looks = next(iter(tests.values())).looks
    failures = np.cumsum(rng.binomial(np.diff(np.concatenate([[0], looks]))[None, :], 1 - p[:, None]), axis=1)
    thresholds = next(iter(tests.values())).thresholds
    allowed = [int(np.flatnonzero(binom.cdf(np.arange(n_max + 1), n_max, 1 - c) <= alpha).max(initial=-1))
               for c in thresholds]
    certify = [float((right & (failures[:, -1] <= a)).mean()) for a in allowed]
    rows = [{"design": "CERTIFY n = n_max", "passes_ratio": 1.0, "certified": certify}]
    for name, test in tests.items():
        state = test.start(len(p))
        for look, draws in enumerate(looks):
            active = np.flatnonzero(~state.done)
            if active.size:
                test.observe(state, active, draws - failures[active, look])
        passes = test.draws_done(state).sum() + n0 * len(p)
        rows.append({"design": name, "passes_ratio": float(len(p) * (n0 + n_max) / passes),
                     "certified": [float((right & state.certified[:, k]).mean()) for k in range(len(thresholds))]})
    for row in rows:
        figures = ", ".join(f"r={r:g}: {c:.3f}" for r, c in zip([0.0, *radii], row["certified"]))
        click.echo(f"  {row['design']:<30} {row['passes_ratio']:5.2f}x fewer passes; certified {figures}")
    return rows


def forward_share(samples: int, run: dict) -> float:
    """Forward-pass-only time (at the run's own eager rate) over the run's whole-call time."""
    return samples / run["forward_samples_per_second"] / run["seconds"]


def report_efficiency(name: str, label: str, model: JointModel, sigma: float, args: dict,
                      counts: list[int], cold_repeats: int = 3) -> list[dict]:
    """Certify at its limit: the time the same forward passes alone take (eager, on one fixed batch, measured in
    the whole call's own process right after it) over the whole call's time (a fresh process, automatic compile,
    warm-up included), with empty compile caches (the median of `cold_repeats` first runs) and with warm ones."""
    batch, per_image = args["batch_size"], args["n0"] + args["n"]
    rows = []
    for count in counts:
        samples = -(-count * per_image // batch) * batch
        whole = whole_call(name, sigma, {**args, "n_images": count}, cold_repeats)
        efficiency = functools.partial(forward_share, samples)
        cold = sorted(whole["cold_runs"], key=efficiency)
        median = cold[len(cold) // 2]
        warm = whole["warm_caches"]
        row = {"model": name, "images": count, "samples": samples,
               "cold": {**median, "efficiency": efficiency(median),
                        "efficiencies": [efficiency(run) for run in whole["cold_runs"]]},
               "warm": {**warm, "efficiency": efficiency(warm)}}
        row["cold"].pop("cold_runs", None)
        rows.append(row)
        click.echo(f"{label} at {count} images, empty compile caches (median of {len(cold)}): forward passes alone "
                   f"{samples / median['forward_samples_per_second']:.1f} s (eager "
                   f"{median['forward_samples_per_second']:.0f} samples/s), whole call {median['seconds']:.1f} s "
                   f"(compile={median['compile']}): efficiency {row['cold']['efficiency']:.2f} (runs: "
                   + ", ".join(f"{e:.2f}" for e in row["cold"]["efficiencies"]) + f"); warm caches: whole call "
                   f"{warm['seconds']:.1f} s, efficiency {row['warm']['efficiency']:.2f}")
    return rows


def report_whole_call(name: str, sigma: float, args: dict, loop: Timing | None) -> dict:
    """Time the whole call and print it beside the per-image loop's time."""
    whole = whole_call(name, sigma, args)
    for run, caches in ((whole, "empty compile caches"), (whole["warm_caches"], "warm compile caches")):
        versus = f", {loop.seconds / run['seconds']:.2f}x the per-image loop" if loop else ""
        click.echo(f"whole call (one certify call, auto compile -> compile={run['compile']}, warm-up included, "
                   f"fresh process, {caches}): {run['seconds']:.1f} s{versus}")
    return whole


def report_agreement(other: str, ours: list, theirs: list) -> dict:
    """How often another certifier makes the same decision, and how far its radii are from ours."""
    same = sum(a[0] == b[0] for a, b in zip(ours, theirs)) / len(ours)
    gap = float(np.mean([abs(a[1] - b[1]) for a, b in zip(ours, theirs)]))
    click.echo(f"vs {other}: same prediction/abstain on {same:.1%} of images, mean |radius difference| "
               f"{gap:.4f} (Monte-Carlo noise), mean radius {np.mean([b[1] for b in theirs]):.4f} vs ours "
               f"{np.mean([a[1] for a in ours]):.4f}")
    return {"same_prediction": same, "mean_abs_radius_difference": gap}


def bench_model(name: str, label: str, model: JointModel, x: Tensor, y: Tensor, sigma: float, args: dict) -> dict:
    device = model.device
    n0, n, alpha, batch = args["n0"], args["n"], args["alpha"], args["batch_size"]
    samples = n0 + n
    click.echo(f"\n== {label}: {len(x)} images {tuple(x.shape[1:])}, n0={n0}, n={n}, alpha={alpha}, "
               f"batch {batch}, device {device}, {torch.get_num_threads()} threads ==")

    def engine(images: Tensor, labels: Tensor):
        return robusteval.certify(model, (images, labels), sigma=sigma, n0=n0, n=n, alpha=alpha, batch_size=batch,
                                  compile=args["compile"], device=device)

    warm_up, _ = timed("robusteval warm-up (1 image, compiles)", lambda: engine(x[:1], y[:1]), 1, samples, device)
    click.echo(f"robusteval warm-up on 1 image (compile={args['compile']}): {warm_up.seconds:.1f} s")
    timings = []
    timing, result = timed("robusteval", lambda: engine(x, y), len(x), samples, device)
    timings.append(timing)
    cohen_timing, cohen_result = timing, result
    ours = [(r["prediction"], r["radius"]) for r in result.records]
    others = {}
    if not args["skip_loop"]:
        timing, others["per-image loop"] = timed(
            "per-image loop", lambda: per_image_cohen(model, x, sigma, n0, n, alpha, args["loop_batch"]),
            len(x), samples, device)
        timings.append(timing)
    if not args["skip_art"]:
        timing, others["ART"] = timed(
            "ART", lambda: art_certify(model, x, sigma, n0, n, alpha, args["loop_batch"]), len(x), samples, device)
        timings.append(timing)

    step = lambda images: model.logits(images, sigma).argmax(1)  # noqa: E731
    eager = forward_throughput(step, model.input_shape, batch, device)
    # Compiling costs a minute on some machines: the compiled ceiling only when the engine compiles too.
    compiled = forward_throughput(torch.compile(step, dynamic=False, options=COMPILE_OPTIONS), model.input_shape, batch,
                                  device) if args["compile"] else None
    ceiling = compiled if compiled is not None else eager
    reference = {t.method: t for t in timings}
    for t in timings:
        ratios = [f"{t.samples_per_second / reference[name].samples_per_second:.2f}x {name}"
                  for name in ("per-image loop", "ART") if name in reference and name != t.method]
        click.echo(f"{t.method:>15}: {t.seconds:8.1f} s  {t.images_per_second:8.3f} images/s  "
                   f"{t.samples_per_second:10.0f} samples/s  {t.samples_per_second / ceiling:6.1%} of "
                   f"{'compiled' if compiled is not None else 'eager'} forward  {'  '.join(ratios)}")
    click.echo(f"pure forward at batch {batch}: eager {eager:.0f} samples/s"
               + (f", compiled {compiled:.0f} samples/s" if compiled is not None else ""))
    whole = report_whole_call(name, sigma, args, reference.get("per-image loop")) if args["whole_call"] else None
    sequential = None
    if args["sequential_radii"]:
        sequential = compare_sequential(model, x, y, sigma, args["sequential_radii"], args, cohen_timing,
                                        cohen_result)
    agreement = {other: report_agreement(other, ours, theirs) for other, theirs in others.items()}
    return {
        "model": label, "device": str(device), "threads": torch.get_num_threads(), "images": len(x),
        "n0": n0, "n": n, "alpha": alpha, "batch_size": batch, "compile": args["compile"],
        "warm_up_seconds": warm_up.seconds,
        "methods": [{**asdict(t), "images_per_second": t.images_per_second,
                     "samples_per_second": t.samples_per_second} for t in timings],
        "forward_samples_per_second": {"eager": eager, "compiled": compiled},
        "agreement": agreement,
        "whole_call": whole,
        "sequential": sequential,
    }


@click.command()
@click.option("--models", default="digits,resnet18", show_default=True,
              help="Comma-separated: digits, cdn, resnet18.")
@click.option("--n-images", type=int, default=100, show_default=True, help="Digits test images.")
@click.option("--resnet-images", type=int, default=4, show_default=True, help="Random 3×32×32 images for ResNet-18.")
@click.option("--n0", type=int, default=100, show_default=True)
@click.option("--n", type=int, default=10_000, show_default=True)
@click.option("--alpha", type=float, default=0.001, show_default=True)
@click.option("--sigma", type=float, default=0.25, show_default=True)
@click.option("--batch-size", type=int, default=1000, show_default=True, help="robusteval's pairs per pass.")
@click.option("--loop-batch", type=int, default=1000, show_default=True,
              help="Noise draws per pass of the per-image loop and of ART.")
@click.option("--compile/--no-compile", "compile_model", default=True, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
@click.option("--skip-loop", is_flag=True, help="Leave out the per-image loop.")
@click.option("--skip-art", is_flag=True, help="Leave out ART.")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the figures as JSON.")
@click.option("--whole-call/--no-whole-call", default=True, show_default=True,
              help="Also time one certify call as a user runs it (auto compile, warm-up included, fresh process).")
@click.option("--sequential-radii", default=None,
              help="Also run the sequential method with n_max = n on this radius grid (e.g. 0.25,0.5,0.75).")
@click.option("--simulate-designs", "pilot_n", type=int, default=None, metavar="PILOT_N",
              help="Only simulate the sequential designs: CERTIFY with n = PILOT_N gives each image's p_A posterior, "
                   "then shared Bernoulli streams give forward passes and certified accuracy against CERTIFY at n.")
@click.option("--power-grid", "power_streams", type=int, default=None, metavar="STREAMS",
              help="Only simulate power against CERTIFY at n on STREAMS shared Bernoulli streams per case, across "
                   "the band where CERTIFY certifies 5-95% (radii: --sequential-radii, default 0.25,0.5,0.75).")
@click.option("--efficiency", default=None, metavar="N1,N2,...",
              help="Only measure efficiency (forward-pass-only time / whole-call time) at these image counts.")
@click.option("--efficiency-repeats", default=3, show_default=True,
              help="First runs (each with empty compile caches) per --efficiency point; the median is reported.")
@click.option("--whole-call-child", default=None, hidden=True, help="Internal: run one timed whole call.")
def main(models: str, n_images: int, resnet_images: int, n0: int, n: int, alpha: float, sigma: float,
         batch_size: int, loop_batch: int, compile_model: bool, device: str, threads: int | None, skip_loop: bool,
         skip_art: bool, json_out: str | None, whole_call: bool, sequential_radii: str | None,
         pilot_n: int | None, power_streams: int | None, efficiency: str | None, efficiency_repeats: int,
         whole_call_child: str | None) -> None:
    """Images/s and samples/s of three randomized-smoothing certifiers on the same models and images."""
    if whole_call_child is not None:
        run_whole_call_child(json.loads(whole_call_child))
        return
    if threads is not None:
        torch.set_num_threads(threads)
    target = resolve_device(device)
    radii = [float(r) for r in sequential_radii.split(",") if r.strip()] if sequential_radii else []
    args = {"n0": n0, "n": n, "alpha": alpha, "batch_size": batch_size, "loop_batch": loop_batch,
            "compile": compile_model, "skip_loop": skip_loop, "skip_art": skip_art, "whole_call": whole_call,
            "sequential_radii": radii, "n_images": n_images, "resnet_images": resnet_images, "device": device,
            "threads": threads}
    if power_streams is not None:
        click.echo(f"== power on shared streams: sigma {sigma}, alpha {alpha}, n_max {n}, {power_streams} streams ==")
        power_grid(sigma, alpha, n, power_streams, radii or [0.25, 0.5, 0.75])
        return
    if efficiency is not None:
        counts = [int(c) for c in efficiency.split(",") if c.strip()]
        rows = []
        for name in [m.strip() for m in models.split(",") if m.strip()]:
            label, model, _, _ = build_model(name, max(counts), resnet_images, target)
            rows += report_efficiency(name, label, model, sigma, args, counts, efficiency_repeats)
        if json_out:
            with open(json_out, "w") as handle:
                json.dump(rows, handle, indent=2)
        return
    if pilot_n is not None:
        for name in [m.strip() for m in models.split(",") if m.strip()]:
            label, model, x, y = build_model(name, n_images, resnet_images, target)
            pilot = robusteval.certify(model, (x, y), sigma=sigma, n0=n0, n=pilot_n, alpha=alpha,
                                       batch_size=batch_size, device=model.device)
            counts = np.array([r["count"] for r in pilot.records])
            correct = np.array([r["top_class"] == r["label"] for r in pilot.records])
            click.echo(f"== {label}: {len(x)} images, p_A posteriors from n = {pilot_n}, simulated at n_max = {n} ==")
            simulate_designs(counts, correct, pilot_n, sigma, radii or [0.25, 0.5, 0.75], alpha, n, n0)
        return
    results = []
    for name in [m.strip() for m in models.split(",") if m.strip()]:
        label, model, x, y = build_model(name, n_images, resnet_images, target)
        results.append(bench_model(name, label, model, x, y, sigma, args))
    if json_out:
        with open(json_out, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
