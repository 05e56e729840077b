"""`robusteval benchmark`: run a standard grid of evaluations over the model zoo, then report.

A suite is a fixed grid (numbers of images, budgets, noise levels):

- every registered model with shipped weights for the data set, under
  `autoattack` on the L∞ and L2 grids;
- for the joint models, adaptive attacks on their deployed pipelines at the
  suite's defense ε: the `denoise:S` purification (gradient `auto`: exact and
  BPDA, a point counts as broken if either breaks it), the randomized
  `noise:S` pipeline (`autoattack-rand`, with EOT) and, for the models of
  `purify_models`, multi-step purification `purify:S:K` by the model's own
  denoiser (`autoattack-rand`, gradient `auto`: exact through every step,
  BPDA and the one-step surrogate, worst case per point);
- randomized-smoothing certification at each σ of the suite, `direct`, and
  `denoised` for models with a denoiser; a baseline trained at one σ (its card's
  recipe says which) is certified at that σ only;
- a `denoise` run (PSNR vs σ) for every model with a denoiser.

Every evaluation writes its own run directory under `<out>/<suite>/`, named
after what it evaluates, so re-running the same command resumes unfinished
runs and skips finished ones. Jobs can run in parallel processes (`jobs`),
each single-threaded. `benchmark.json` in the suite folder records the suite's
parameters and each job's wall time.

`digits` is the leaderboard's suite; `digits-ci` is the CI-sized grid whose
figures `reports/baseline.json` holds for `robusteval check`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fnmatch
import logging
import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from robusteval.attacks.evaluate import evaluate_attack
from robusteval.core.atomic_files import atomic_write_json
from robusteval.core.devices import resolve_device
from robusteval.core.errors import UsageError
from robusteval.core.names import resolve_name
from robusteval.core.vocabulary import (
    NORM_SYMBOL,
    SGLD_NOISE,
    SGLD_STEP,
    SMOOTHING_MODES,
    DefenseSpec,
)
from robusteval.data import default_eps
from robusteval.generative.denoising import evaluate_denoising
from robusteval.jobs import JobOptions
from robusteval.model_zoo.factory import list_models, model_card
from robusteval.reports.paths import slug
from robusteval.runs.shards import Shard
from robusteval.smoothing.engine import certify

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Suite:
    """One standard grid of evaluations."""

    name: str
    dataset: str
    description: str
    n_attack: int  # test points per attack run without a defense
    n_defense: int  # test points per adaptive-attack run on a joint model's pipeline
    n_certify: int  # test images per certification run
    n0: int
    n: int
    alpha: float
    sigmas: tuple[float, ...]  # certification noise levels
    defense_sigma: float  # S of the denoise:S and noise:S pipelines
    eps: dict[str, tuple[float, ...] | None]  # per norm; None: the engine's default grid for the data set
    # Adaptive attacks on a pipeline cost 10-50× an attack on the bare model: one headline ε per norm.
    defense_eps: dict[str, tuple[float, ...]] = field(default_factory=lambda: {"Linf": (0.1,)})
    defenses: bool = True
    denoise_sigmas: tuple[float, ...] = (0.12, 0.25, 0.5)
    denoise_images: int = 500
    large_eps_check: bool = True
    # JEM's refinement (`attack_model.py`'s refined_logits) on the models trained with SGLD chains.
    sgld_models: tuple[str, ...] = ("jem", "gmmc")
    sgld_steps: int = 1
    # DiffPure-style purify:S:K (ddpm) on the joint models deployed that way. An attack through it costs K
    # denoiser passes per EOT draw for each of the three gradients of `auto`, and a model whose cross-entropy
    # saturates (cdn) adds the remedies through all three: hence few steps and few points.
    purify_models: tuple[str, ...] = ("jdm", "egc", "cdn")
    purify_steps: int = 2
    n_purify: int = 10

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# What runs one grid entry of each kind.
EVALUATORS: dict[str, Callable[..., Any]] = {"attack": evaluate_attack, "certify": certify,
                                             "denoise": evaluate_denoising}
SUITES: dict[str, Suite] = {
    "digits": Suite(
        name="digits", dataset="digits",
        description="the digits leaderboard: every zoo model, AutoAttack L∞/L2 grids, adaptive attacks on the "
                    "joint models' pipelines, certification at σ = 0.12/0.25/0.5 (direct and denoised), PSNR",
        # Sized to finish within 60 minutes on 2 CPU cores with --jobs 2 (benchmarks/RESULTS.md has the timing).
        # sgld:1 is the paper's JEM-1; JEM-10 costs ~100 s a point here (~34 min a model at 20 points).
        n_attack=40, n_defense=20, n_certify=100, n0=100, n=2_000, alpha=0.001, sigmas=(0.12, 0.25, 0.5),
        defense_sigma=0.25, eps={"Linf": None, "L2": None},
    ),
    "digits-ci": Suite(
        name="digits-ci", dataset="digits",
        description="CI-sized grid for the regression gate: AutoAttack at the headline ε of each norm and "
                    "certification at σ = 0.25, on few images",
        n_attack=25, n_defense=0, n_certify=25, n0=50, n=500, alpha=0.001, sigmas=(0.25,), defense_sigma=0.25,
        eps={"Linf": (0.1,), "L2": (1.0,)}, defenses=False, denoise_sigmas=(0.25,), denoise_images=50,
        large_eps_check=False,
    ),
}


@dataclass(frozen=True)
class GridRun:
    """One evaluation of the grid: its kind, model, arguments and run directory."""

    kind: str  # attack, certify or denoise
    model: str
    dataset: str
    arguments: dict[str, Any]
    out: Path
    cost: float  # a rough relative cost, to start the longest jobs first
    # The robusteval.jobs.JobOptions given to the benchmark (device, data_dir, ...), passed to every evaluation.
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.out.name


@dataclass
class BenchmarkResult:
    """What a benchmark run did."""

    suite: Suite
    folder: Path
    finished: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    planned: list[Path] = field(default_factory=list)  # every run of the suite, this shard's or not


def resolve_suite(name: str) -> Suite:
    return SUITES[resolve_name(name, SUITES, "suite")]


def suite_models(suite: Suite, patterns: Sequence[str] = ("*",)) -> list[str]:
    """Registered models with shipped weights for the suite's data set, matching any pattern."""
    models = []
    for name in list_models():
        if not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        if suite.dataset in model_card(name).checkpoints():
            models.append(name)
        else:
            logger.warning("skipping %s: no shipped weights for %s", name, suite.dataset)
    return models


def plan(suite: Suite, models: Sequence[str], folder: Path, **options: Any) -> list[GridRun]:
    """The suite's jobs for these models, longest first; `options` (JobOptions) go to every job."""
    jobs: list[GridRun] = []
    for model in models:
        card = model_card(model)
        can_denoise = "denoise" in card.capabilities
        for norm, eps in suite.eps.items():
            arguments = {"attack": "autoattack", "norm": norm, "eps": eps, "n": suite.n_attack, "defense": "none",
                         "large_eps_check": suite.large_eps_check}
            jobs.append(GridRun("attack", model, suite.dataset, arguments,
                            folder / f"attack-{slug(model)}-{norm}-autoattack",
                            cost=suite.n_attack * (len(eps) if eps else 5)))
        if suite.defenses and card.family == "joint" and suite.n_defense > 0:
            s = f"{suite.defense_sigma:g}"
            for norm, eps in suite.defense_eps.items():
                eps = list(eps)
                if can_denoise:
                    arguments = {"attack": "autoattack", "norm": norm, "eps": eps, "n": suite.n_defense,
                                 "defense": f"denoise:{s}", "gradient": "auto",
                                 "large_eps_check": suite.large_eps_check}
                    jobs.append(GridRun("attack", model, suite.dataset, arguments,
                                    folder / f"attack-{slug(model)}-{norm}-autoattack-denoise{s}",
                                    cost=suite.n_defense * len(eps) * 8))
                arguments = {"attack": "autoattack-rand", "norm": norm, "eps": eps, "n": suite.n_defense,
                             "defense": f"noise:{s}", "large_eps_check": suite.large_eps_check}
                jobs.append(GridRun("attack", model, suite.dataset, arguments,
                                folder / f"attack-{slug(model)}-{norm}-autoattack-rand-noise{s}",
                                cost=suite.n_defense * len(eps) * 1.5))
                if model in suite.sgld_models and "energy" in card.capabilities:
                    defense = sgld_defense(card.recipe, suite.sgld_steps)
                    arguments = {"attack": "autoattack-rand", "norm": norm, "eps": eps, "n": suite.n_defense,
                                 "defense": defense, "gradient": "auto", "large_eps_check": suite.large_eps_check}
                    jobs.append(GridRun("attack", model, suite.dataset, arguments,
                                    folder / f"attack-{slug(model)}-{norm}-autoattack-rand-sgld{suite.sgld_steps}",
                                    cost=suite.n_defense * len(eps) * 4 * suite.sgld_steps))
                if model in suite.purify_models and can_denoise and suite.n_purify > 0:
                    k = suite.purify_steps
                    arguments = {"attack": "autoattack-rand", "norm": norm, "eps": eps, "n": suite.n_purify,
                                 "defense": f"purify:{s}:{k}", "gradient": "auto",
                                 "large_eps_check": suite.large_eps_check}
                    jobs.append(GridRun("attack", model, suite.dataset, arguments,
                                    folder / f"attack-{slug(model)}-{norm}-autoattack-rand-purify{s}-{k}",
                                    cost=suite.n_purify * len(eps) * 30 * k))
        own_sigma = card.recipe.get("sigma")
        sigmas = (float(own_sigma),) if isinstance(own_sigma, (int, float)) else suite.sigmas
        modes = SMOOTHING_MODES if can_denoise else ("direct",)
        for sigma in sigmas:
            for mode in modes:
                arguments = {"sigma": sigma, "mode": mode, "n0": suite.n0, "n": suite.n, "alpha": suite.alpha,
                             "n_images": suite.n_certify}
                # Relative to an attack's cost of one point at one ε (measured on jdm, the slowest model).
                cost = suite.n_certify * (suite.n0 + suite.n) / 5_000 * (2 if mode == "denoised" else 1)
                jobs.append(GridRun("certify", model, suite.dataset, arguments,
                                folder / f"certify-{slug(model)}-{mode}-s{sigma:g}", cost=cost))
        if can_denoise:
            arguments = {"sigmas": list(suite.denoise_sigmas), "n_images": suite.denoise_images}
            jobs.append(GridRun("denoise", model, suite.dataset, arguments, folder / f"denoise-{slug(model)}",
                            cost=1.0))
    return sorted((dataclasses.replace(job, options=dict(options)) for job in jobs), key=lambda j: -j.cost)


def sgld_defense(recipe: dict[str, Any], steps: int) -> str:
    """`sgld:K` with the step and noise of the model's own training chains: JEM's are the official refinement's;
    GMMC's chains step 0.01, and JEM's 0.25 on GMMC's energy took its images off the data (clean accuracy 45%
    against 90% with its own step, 20 digits points)."""
    spec = DefenseSpec("sgld", steps=steps, step_size=float(recipe.get("sgld_step_size", SGLD_STEP)),
                       noise=float(recipe.get("sgld_noise", SGLD_NOISE)))
    return str(spec)


def describe_suite(suite: Suite, run_seconds: float | None = None) -> str:
    """The grid's sizes in one paragraph, for the report: small samples must be read with their intervals.

    run_seconds: the runs' own wall times summed (each run records it, so a resumed grid still counts them).
    """
    # deferred: scipy.stats costs ~0.6 s to import
    from scipy.stats import norm as normal

    def grid(eps_by_norm: dict[str, Any]) -> str:
        parts = []
        for norm, eps in eps_by_norm.items():
            values = eps if eps is not None else default_eps(suite.dataset, norm)
            parts.append(f"{NORM_SYMBOL[norm]} ε ∈ {{{', '.join(f'{e:g}' for e in values)}}}")
        return "; ".join(parts)

    # With every draw correct, the Clopper-Pearson bound is α^(1/n): no radius beyond σ·Φ⁻¹(α^(1/n)) can be certified.
    reach = float(normal.ppf(suite.alpha ** (1 / suite.n)))
    text = [f"Grid (suite {suite.name}, {suite.dataset} test split): AutoAttack on {suite.n_attack} points per "
            f"model and norm ({grid(suite.eps)})."]
    if suite.defenses and suite.n_defense > 0:
        text.append(f"Adaptive attacks on the joint models' denoise:{suite.defense_sigma:g} and "
                    f"noise:{suite.defense_sigma:g} pipelines on {suite.n_defense} points ({grid(suite.defense_eps)}).")
        if suite.n_purify > 0 and suite.purify_models:
            text.append(f"Multi-step purification purify:{suite.defense_sigma:g}:{suite.purify_steps} "
                        f"({', '.join(suite.purify_models)}) on {suite.n_purify} points, gradient auto.")
    text.append(f"Certification of {suite.n_certify} images per model, σ and mode with n0 = {suite.n0}, "
                f"n = {suite.n:,}, α = {suite.alpha:g} (the largest certifiable radius is {reach:.2f}σ).")
    text.append(f"PSNR on {suite.denoise_images} images. Samples are small: read every figure with its 95% interval.")
    if run_seconds is not None:
        text.append(f"The runs took {run_seconds / 60:.0f} min of single-threaded compute in all.")
    return " ".join(text)


def run_job(job: GridRun) -> tuple[str, float]:
    """Run one job in this process (single-threaded torch on the CPU); returns its run directory and wall seconds."""
    if resolve_device(job.options.get("device") or "auto").type == "cpu":
        # Jobs run side by side, one per core; on a GPU the host threads feed the device instead.
        torch.set_num_threads(1)
    start = time.perf_counter()
    if job.kind not in EVALUATORS:
        raise ValueError(f"unknown job kind {job.kind!r}")
    EVALUATORS[job.kind](job.model, job.dataset, out=job.out, **job.arguments, **job.options)
    return str(job.out), round(time.perf_counter() - start, 1)


def run_benchmark(
    suite: Suite,
    out: str | Path = "runs",
    models: Sequence[str] = ("*",),
    jobs: int = 1,
    on_event: Callable[[str], None] | None = None,
    **options: Any,
) -> BenchmarkResult:
    """Run every job of the suite (resuming finished and unfinished runs) under `<out>/<suite name>/`.

    `options`: the `robusteval.jobs.JobOptions` of every evaluation (device,
    data_dir, ...), given to each job; `dataset` replaces the suite's data set.
    The zoo's shipped weights are evaluated, so checkpoint and model_dir are refused.
    """
    if jobs < 1:
        raise UsageError(f"jobs must be at least 1, got {jobs}")
    # A benchmark's shard is a part of its list of runs, not of each run's images.
    shard = Shard.parse(options.pop("shard", None))
    if options.pop("every", 1) != 1:
        raise UsageError("--every applies to run, certify and predict (and each claim of the papers suite sets "
                         "its own); a grid suite evaluates its own images")
    if options.get("deterministic") is None:
        options["deterministic"] = True  # a benchmark's figures are compared across runs and machines
    suite = _with_options(suite, options)
    say = on_event or (lambda message: logger.info("%s", message))
    folder = Path(out) / suite.name
    folder.mkdir(parents=True, exist_ok=True)
    names = suite_models(suite, models)
    if not names:
        raise UsageError(f"no registered model with {suite.dataset} weights matches {', '.join(models)}")
    every = plan(suite, names, folder, **options)
    work = shard.pick(every) if shard is not None else every
    work = spread_devices(work, jobs, options.get("device"))
    say(f"suite {suite.name}: {len(work)} runs" + (f" (shard {shard.label} of {len(every)})" if shard else "")
        + f" for {len(names)} models ({', '.join(names)}) in {folder}, {jobs} process(es)")
    result = BenchmarkResult(suite=suite, folder=folder, planned=[Path(job.out) for job in every])
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def finished(job: GridRun, outcome: tuple[str, float] | BaseException) -> None:
        if isinstance(outcome, BaseException):
            result.failed[job.label] = f"{type(outcome).__name__}: {outcome}"
            say(f"FAILED {job.label}: {outcome}")
        else:
            result.finished.append(Path(outcome[0]))
            timings[job.label] = outcome[1]
            say(f"done {job.label} in {outcome[1]:.0f} s ({len(result.finished)}/{len(work)})")

    _run_jobs(work, jobs, finished, say)
    result.seconds = round(time.perf_counter() - start, 1)
    atomic_write_json(folder / "benchmark.json", {
        "suite": suite.as_dict(), "models": names, "jobs": jobs, "device": options.get("device") or "auto",
        "options": {k: str(v) for k, v in options.items() if v not in (None, False)}, "seconds": result.seconds,
        "runs": {job.label: {"kind": job.kind, "model": job.model, "arguments": job.arguments,
                             "seconds": timings.get(job.label), "error": result.failed.get(job.label)}
                 for job in work},
    })
    return result


def spread_devices(work: list[GridRun], jobs: int, device: Any, gpus: int | None = None) -> list[GridRun]:
    """With several processes and the default device, job i runs on cuda:(i mod G) of the G visible GPUs."""
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if jobs < 2 or gpus < 1 or device not in (None, "auto"):
        return work
    return [dataclasses.replace(job, options={**job.options, "device": f"cuda:{i % gpus}"})
            for i, job in enumerate(work)]


def _with_options(suite: Suite, options: dict[str, Any]) -> Suite:
    """The suite on the data set the options name (popped from them); other weights are refused."""
    shared = JobOptions.of(options.pop("dataset", suite.dataset), options)
    if shared.checkpoint is not None or shared.model_dir is not None or shared.denoiser is not None:
        raise UsageError("a benchmark evaluates the zoo's shipped weights; checkpoint, model_dir and denoiser apply "
                         "to one model")
    if not isinstance(shared.dataset, str):
        raise UsageError("a benchmark's data set must be given by name")
    return dataclasses.replace(suite, dataset=shared.dataset)


def _run_jobs(work: list[GridRun], jobs: int, finished: Callable[[GridRun, Any], None], say: Callable[[str], None]) -> None:
    """Run the jobs in this process (jobs=1) or in `jobs` fresh processes; report each outcome to `finished`."""
    if jobs == 1:
        for job in work:
            say(f"running {job.label}")
            try:
                finished(job, run_job(job))
            except Exception as error:  # one failed evaluation must not lose the others
                finished(job, error)
        return
    # spawn: fresh interpreters, no forked torch state.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(run_job, job): job for job in work}
        for future in concurrent.futures.as_completed(futures):
            job = futures[future]
            error = future.exception()
            finished(job, error if error is not None else future.result())
