"""The evaluation commands: run, certify, predict, denoise, sample, counterfactual.

Each parses its options, prepares the same job the Python API prepares
(`robusteval.jobs`) and prints what it returns.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from robusteval.attacks.evaluate import prepare_attack
from robusteval.cli.group import main
from robusteval.cli.options import (
    DIGITS_EPS_HELP,
    RESUME_HELP,
    RUN_OUT_HELP,
    WAIT_OPTION,
    echo_err,
    echo_table,
    job_options,
    parse_numbers,
    split_job_options,
)
from robusteval.cli.scale import run_paths, summary_to_print, torchrun_rank
from robusteval.cli.summaries import print_summary
from robusteval.core.errors import UsageError
from robusteval.core.interface import CapabilityError
from robusteval.core.preflight import check_writable_file
from robusteval.core.vocabulary import (
    CERTIFY_METHODS,
    DEFENSE_FORMS,
    GRADIENT_FORMS,
    NORMS,
    SMOOTHING_MODES,
)
from robusteval.data import dataset_budgets
from robusteval.generative.denoising import prepare_denoising
from robusteval.generative.generation import counterfactual, sample
from robusteval.model_zoo.factory import shipped_models, smoothing_base_classifier
from robusteval.reports.loading import load_runs
from robusteval.reports.paths import slug
from robusteval.smoothing.engine import (
    SmoothingJob,
    SmoothingSettings,
    certify_settings,
    prepare_smoothing,
)
from robusteval.smoothing.sequential import SEQUENTIAL_DESIGNS


@main.command("run")
@click.option("--model", "model_name", required=True,
              help="Registered model (see `robusteval list models`), robustbench:<Name>, or package.module:factory "
                   "(a callable returning an nn.Module classifier or a JointModel; see --model-kwargs).")
@click.option("--attack", default="autoattack", show_default=True, help="Attack or suite (see `robusteval list attacks`).")
@job_options
@click.option("--norm", default=NORMS[0], show_default=True, help=f"Threat model: {' or '.join(NORMS)}.")
@click.option("--eps", "eps_text", default=None, metavar="E1,E2,...",
              help=f"Radii to evaluate, numbers or fractions such as 4/255,8/255 (default: the data set's grid; "
                   f"for digits {DIGITS_EPS_HELP}).")
@click.option("--n", "--points", "n", type=int, default=None,
              help="Evaluate the first N test points (default: all). Under torchrun write --points: its own "
                   "parser takes --n for an abbreviation of its options.")
@click.option("--batch-size", type=int, default=500, show_default=True,
              help="Points attacked together; the state is saved after each eps of a batch, so a killed run "
                   "resumes from the last finished (batch, eps).")
@click.option("--defense", default="none", show_default=True,
              help=f"What is attacked: {' | '.join(DEFENSE_FORMS)}.")
@click.option("--gradient", default=None, metavar="|".join(GRADIENT_FORMS),
              help="Gradients through a denoise, purify or sgld defense: exact (full; through every purify step, "
                   "checkpointed), identity backward (bpda), a K'-step purification's (surrogate:K', purify "
                   "only), or all of them (auto, the default there; worst case per point).")
@click.option("--eot", type=int, default=None,
              help="Noise draws per gradient against randomized defenses (default 20 there, else 1).")
@click.option("--decision-draws", type=click.IntRange(1), default=100, show_default=True,
              help="Fresh draws deciding a randomized pipeline's prediction: the majority vote, and worst-of-N "
                   "(fooled on any one draw) reported beside it.")
@click.option("--steps", type=int, default=None, help="Override the attack's iterations (Square: queries).")
@click.option("--step-size", type=float, default=None, help="Override the step size of PGD-type attacks (CW: lr).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of every random draw; each batch's draws depend on it and the batch only.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=RUN_OUT_HELP.format("model>-<dataset>-<attack>-<norm"))
@click.option("--resume/--no-resume", default=True, show_default=True, help=RESUME_HELP)
@click.option("--large-eps-check/--no-large-eps-check", default=True, show_default=True,
              help="Re-run the attack at a very large eps on up to 100 points (a gradient-masking check).")
@click.option("--masking-checks/--no-masking-checks", default=True, show_default=True,
              help="AutoAttack's randomness, softmax-output and dynamic-forward checks and the zero-gradient check "
                   "(one extra gradient pass at the clean points). Turn off only to time a bare attack.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print only the summary as JSON (the run path goes to stderr).")
@WAIT_OPTION
def run_command(model_name: str, eps_text: str | None, out: Path | None, resume: bool, quiet: bool, as_json: bool,
                wait: bool, **params: object) -> None:
    """Adversarial robust accuracy over an eps list; writes a resumable run directory."""
    settings, options = split_job_options(params)
    rank = torchrun_rank(options)
    job = prepare_attack(model_name, options.pop("dataset"), eps=parse_numbers(eps_text, "--eps", "0.05,0.1"), **settings, **options)
    out, merged_out = run_paths(job, out, rank)
    click.echo(f"run directory: {out}", err=True)
    summary = job.run(out=out, resume=resume, progress=not (quiet or as_json), wait=wait,
                      on_wait=echo_err).summary()
    print_summary(*summary_to_print(summary, out, merged_out, rank), as_json)


# --- certify / predict (randomized smoothing) -----------------------------------------------
ALL_MODELS = "all"
# `certify --sigma S` without --model is the design's first command: the default model's CERTIFY at n = 10,000
# costs ~0.28 s an image on 2 CPU cores (forward-bound: 10,100 passes of the digits CNN), so 200 images take about a
# minute; every other form certifies all test images by default.
BARE_CERTIFY_IMAGES = 200


def _smoothing_options(function):
    """Options shared by `certify` and `predict`."""
    options = [
        click.option("--model", "model_name", default=None,
                     help="Registered model name (see `robusteval list models`). Default: the zoo's smoothing base "
                          "classifier trained nearest to --sigma (gaussian at 0.25, gaussian-s0.12, gaussian-s0.5); "
                          f"certify then takes the first {BARE_CERTIFY_IMAGES} images unless --n-images is given. "
                          "certify --model all: every zoo model with shipped weights, then one table."),
        click.option("--sigma", type=float, required=True, help="Std of the smoothing noise, in [0, 1] pixel units."),
        click.option("--mode", type=click.Choice(SMOOTHING_MODES), default=SMOOTHING_MODES[0], show_default=True,
                     help="direct: classify x + σn at σ; denoised: classify the model's denoise(x + σn, σ)."),
        job_options,
        click.option("--alpha", type=float, default=0.001, show_default=True, help="Failure probability α."),
        click.option("--n-images", type=int, default=None,
                     help=f"Number of test images (default: all after --skip; for certify without --model, the first "
                          f"{BARE_CERTIFY_IMAGES})."),
        click.option("--skip", type=int, default=0, show_default=True, help="Start at this test image."),
        click.option("--batch-size", type=int, default=None,
                     help="(image, noise draw) pairs per forward pass; draws of several images share a pass. "
                          "Default: 1,000 on a CPU, up to 10,000 on a GPU (counts do not depend on it)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the noise; each image's draws depend on it and the image's index only."),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help=RUN_OUT_HELP.format("kind>-<model>-<dataset>-s<sigma>-<mode"),),
        click.option("--resume/--no-resume", default=True, show_default=True, help=RESUME_HELP),
        click.option("--compile/--no-compile", "compile", default=None,
                     help="torch.compile the base classifier (static shapes). Default: when the run is long "
                          "enough for compiling to pay off."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (the run path goes to stderr)."),
        WAIT_OPTION,
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _run_smoothing_command(kind: str, model_name: str, sigma: float, mode: str, alpha: float, n: int | None, n0: int,
                           seed: int, out: Path | None, resume: bool, quiet: bool, as_json: bool, wait: bool,
                           method: str = "cohen", radii: list[float] | None = None, n_max: int | None = None,
                           futility: float | None = None, design: str | None = None,
                           **params: object) -> None:
    if kind == "certify":
        settings = certify_settings(sigma=sigma, n0=n0, n=n, alpha=alpha, mode=mode, seed=seed, method=method,
                                    radii=radii, n_max=n_max, futility=futility, design=design)
    else:
        settings = SmoothingSettings(kind, sigma=sigma, n=n, alpha=alpha, n0=n0, mode=mode, seed=seed)
    run_settings, options = split_job_options(params)
    dataset = options.pop("dataset")
    if model_name == ALL_MODELS:
        _certify_every_model(kind, settings, dataset, run_settings, options, out, resume, quiet, as_json, wait)
        return
    if model_name is None:
        model_name = _default_smoothing_model(sigma, dataset)
        if kind == "certify" and run_settings.get("n_images") is None:
            run_settings["n_images"] = BARE_CERTIFY_IMAGES
            echo_err(f"images: the first {BARE_CERTIFY_IMAGES} test images (the default without --model, about a "
                     f"minute on 2 CPU cores; --n-images chooses how many)")
    rank = torchrun_rank(options)
    job = prepare_smoothing(model_name, dataset, settings, **run_settings, **options)
    out, merged_out = run_paths(job, out, rank)
    summary = _run_smoothing_job(job, out, resume, quiet, wait)
    print_summary(*summary_to_print(summary, out, merged_out, rank), as_json)




def _default_smoothing_model(sigma: float, dataset: object) -> str:
    """The zoo's base classifier for σ, said on stderr (stdout may be JSON)."""
    if not isinstance(dataset, str):
        raise UsageError("without --model the data set must be given by name; pass --model")
    name, own = smoothing_base_classifier(sigma, dataset)
    nearest = "" if abs(own - sigma) < 1e-12 else f", the nearest to --sigma {sigma:g}"
    echo_err(f"model: {name} (default: the zoo's smoothing base classifier, trained with Gaussian noise at "
             f"σ = {own:g}{nearest}; --model chooses another)")
    return name


def _run_smoothing_job(job: SmoothingJob, out: Path | None, resume: bool, quiet: bool, wait: bool) -> dict:
    with job.opened_run(out, resume, wait=wait, on_wait=echo_err) as run_dir:
        verb = "resuming" if run_dir.resumed and run_dir.records else "writing"
        click.echo(f"{verb} {run_dir.path} ({len(run_dir.records)}/{job.n_images} images done)", err=True)
        return job.run(run_dir, progress=not quiet).summary


def _certify_every_model(kind: str, settings: object, dataset: object, run_settings: dict, options: dict,
                         out: Path | None, resume: bool, quiet: bool, as_json: bool, wait: bool) -> None:
    """`certify --model all`: each zoo model with shipped weights in turn (its own run directory, under --out
    when given), then one table of certified accuracy per model."""
    if kind != "certify":
        raise UsageError("--model all applies to certify; predict takes one model")
    if options.get("shard") is not None or torchrun_rank(dict(options)) is not None:
        raise UsageError("--model all runs the models one after the other; shard one model at a time")
    if not isinstance(dataset, str):
        raise UsageError("--model all needs a data set given by name")
    summaries = {}
    for name in shipped_models(dataset):
        try:
            job = prepare_smoothing(name, dataset, settings, **run_settings, **options)
        except CapabilityError as error:  # e.g. --mode denoised on a model without a denoiser
            echo_err(f"skipping {name}: {error}")
            continue
        echo_err(f"model {name}")
        target = out / slug(name) if out is not None else job.default_run_dir()
        summaries[name] = (_run_smoothing_job(job, target, resume, quiet, wait), target)
    if not summaries:
        raise UsageError(f"no zoo model with shipped weights for '{dataset}' can be certified this way")
    if as_json:
        click.echo(json.dumps({name: summary for name, (summary, _) in summaries.items()}, indent=2))
        return
    runs = {name: load_runs([target])[0] for name, (_, target) in summaries.items()}
    radii = dataset_budgets(dataset).table_radii
    first = next(iter(summaries.values()))[0]
    click.echo(f"certified accuracy ({first['n_images']} images, σ={first['sigma']:g}, {first['mode']}, "
               f"n={first['n']:,}, α={first['alpha']:g}):")
    echo_table(("model", *(f"r={r:g}" for r in radii), "ACR", "abstain", "run"),
               [(name, *(f"{run.certified_accuracy_at(r):.3f}" for r in radii), f"{run.summary['acr']:.3f}",
                 f"{run.summary['abstain_rate']:.3f}", str(run.path)) for name, run in runs.items()])


@main.command("certify")
@_smoothing_options
@click.option("--n0", type=int, default=100, show_default=True, help="Selection draws per image (pick the class).")
@click.option("--n", "--draws", "n", type=int, default=None,
              help="Estimation draws per image (bound its probability); method cohen, default 10,000; --draws under torchrun.")
@click.option("--method", type=click.Choice(CERTIFY_METHODS), default=CERTIFY_METHODS[0], show_default=True,
              help="cohen: CERTIFY with n draws; sequential: draw until every --radii radius is decided (<= --n-max).")
@click.option("--radii", callback=lambda _c, _p, value: parse_numbers(value, "--radii", "0.25,0.5"), default=None, metavar="R1,R2,...",
              help="Sequential method: the radius grid, comma-separated (default 0.25,0.5,0.75,1.0).")
@click.option("--n-max", type=int, default=None,
              help="Sequential method: at most this many estimation draws per image (default 100,000).")
@click.option("--futility", type=float, default=None, metavar="CHANCE",
              help="Sequential method: give a radius up once its chance to be certified at --n-max is below CHANCE "
                   "even at p_A's upper 95%% bound (default 0.02; 0: draw until decided or --n-max).")
@click.option("--design", type=click.Choice(SEQUENTIAL_DESIGNS), default=None,
              help="Sequential method: spending (default; certifies whatever CERTIFY at --n-max would) or betting "
                   "(the earlier design: fewer draws, fewer certificates near a threshold; resumes its runs).")
def certify_command(**params: object) -> None:
    """Certified L2 radii by randomized smoothing (Cohen et al. 2019 CERTIFY, or sequential on a radius grid);
    writes a run directory."""
    _run_smoothing_command("certify", **params)


@main.command("predict")
@_smoothing_options
@click.option("--n", "--draws", "n", type=int, default=1000, show_default=True,
              help="Noise draws per image; --draws under torchrun.")
def predict_command(**params: object) -> None:
    """The smoothed classifier's predictions, abstaining when not significant (Cohen et al. 2019 PREDICT)."""
    _run_smoothing_command("predict", n0=0, **params)


# --- denoise (PSNR of a model's own denoiser) ----------------------------------------------------
@main.command("denoise")
@click.option("--model", "model_name", required=True, help="A registered model with the `denoise` capability.")
@job_options
@click.option("--sigmas", default="0.12,0.25,0.5", show_default=True, metavar="S1,S2,...",
              help="Noise levels (std in [0, 1] pixel units).")
@click.option("--n-images", type=click.IntRange(1), default=None, help="First N test images (default: all).")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Images per batch (it fixes each image's noise). Default: 100 on a CPU, 1,000 on a GPU.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the noise (per batch).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=RUN_OUT_HELP.format("denoise>-<model>-<dataset"))
@click.option("--resume/--no-resume", default=True, show_default=True, help=RESUME_HELP)
@WAIT_OPTION
def denoise_command(model_name: str, sigmas: str, out: Path | None, resume: bool, wait: bool,
                    **params: object) -> None:
    """PSNR of the model's denoiser on noisy test images, per noise level; writes a run directory."""
    levels = parse_numbers(sigmas, "--sigmas", "0.12,0.25")
    settings, options = split_job_options(params)
    job = prepare_denoising(model_name, options.pop("dataset"), sigmas=levels, **settings, **options)
    summary = job.run(out or job.default_run_dir(), resume=resume, wait=wait, on_wait=echo_err)
    rows = [(f"{p['sigma']:g}", f"{p['psnr']:.2f}", f"{p['psnr_noisy']:.2f}") for p in summary["psnr"]]
    echo_table(("sigma", "PSNR denoised (dB)", "PSNR noisy (dB)"), rows)
    click.echo(f"{summary['seconds']:.1f} s; run: {summary['path']}")


# --- sample / counterfactual (generative joint models) ------------------------------------------
@main.command("sample")
@click.option("--model", "model_name", required=True, help="A registered model with the `sample` capability.")
@click.option("--n", type=click.IntRange(1, 10_000), default=100, show_default=True,
              help="Number of samples, drawn in a grid of 10 per row.")
@click.option("--class", "class_index", type=int, default=None,
              help="Draw every sample from this class (default: class-conditional rows, one class per row).")
@click.option("--conditional/--unconditional", default=True, show_default=True,
              help="Class-conditional rows (row r shows class r), or unconditional samples of p(x).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler's noise.")
@job_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("samples.png"), show_default=True,
              help="PNG file to write.")
def sample_command(model_name: str, **params: object) -> None:
    """Draw samples from a generative joint model and write them as a PNG grid.

    Also prints the `standard` baseline's mean confidence in the requested
    classes (or, for unconditional samples, in its own top class). --dataset
    names the data set the model was trained on.
    """
    check_writable_file(params["out"], "image file")
    settings, options = split_job_options(params)
    result = sample(model_name, options.pop("dataset"), **settings, **options)
    message = f"wrote {result.path}: {len(result.samples)} {result.kind} samples of {result.model}"
    if result.standard_confidence is not None:
        message += f"; standard's mean confidence {result.standard_confidence:.3f}"
    click.echo(message)


@main.command("counterfactual")
@click.option("--model", "model_name", default="jdm", show_default=True,
              help="A model that computes counterfactual explanations (jdm).")
@click.option("--n", type=click.IntRange(1, 1000), default=10, show_default=True, help="Number of test images.")
@click.option("--target", type=int, default=None,
              help="Target class for every image (default: a random class other than the true one, per image).")
@click.option("--t-start", type=float, default=None,
              help="Diffusion time the images are noised to before guided denoising (default: the model's).")
@click.option("--guidance", type=float, default=None, help="Classifier-guidance scale (default: the model's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the images chosen, targets and noise.")
@job_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("counterfactuals.png"),
              show_default=True, help="PNG file to write.")
def counterfactual_command(model_name: str, **params: object) -> None:
    """Visual counterfactual explanations: test images changed to be classified as a target class.

    Writes originals above their counterfactuals, each captioned with the
    judge's prediction, and prints how often that prediction flipped to the
    target and how far (L2) the counterfactuals moved. The judge is the
    `standard` baseline where it has shipped weights for the data set, else
    the model's own classifier (then not an independent judge).
    """
    check_writable_file(params["out"], "image file")
    settings, options = split_job_options(params)
    result = counterfactual(model_name, options.pop("dataset"), **settings, **options)
    count = len(result.labels)
    click.echo(f"wrote {result.path}: {count} counterfactuals of {result.model}; {result.judge} predicts the target for "
               f"{int(result.flipped.sum())}/{count} ({float(result.flipped.float().mean()):.0%}); mean L2 change "
               f"{float(result.distance.mean()):.3f}")
