"""The `robusteval` command line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from robusteval.names import UnknownNameError

logger = logging.getLogger("robusteval")


class FriendlyGroup(click.Group):
    """Turns the library's expected errors into one clear line and exit code 2."""

    def invoke(self, ctx: click.Context):
        from robusteval.checkpoints import CheckpointError
        from robusteval.interface import CapabilityError
        from robusteval.runs import RunConfigMismatch

        try:
            return super().invoke(ctx)
        except (UnknownNameError, CheckpointError, CapabilityError, RunConfigMismatch, FileNotFoundError,
                NotADirectoryError, ValueError) as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="robusteval")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Evaluate adversarial and certified robustness of (joint generative-discriminative) image classifiers."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


# --- list ------------------------------------------------------------------------------------
@main.group("list")
def list_group() -> None:
    """List what robusteval knows: models, datasets, attacks."""


@list_group.command("models")
@click.option("--filter", "pattern", default="*", show_default=True, help="Shell-style pattern on model names.")
@click.option("--json", "as_json", is_flag=True, help="Print the model cards as JSON.")
def list_models_command(pattern: str, as_json: bool) -> None:
    """The model zoo: name, family, capabilities and shipped weights."""
    from robusteval.model_zoo.registry import list_models, model_card

    cards = [model_card(name) for name in list_models(pattern)]
    if as_json:
        click.echo(json.dumps([card.as_dict() for card in cards], indent=2))
        return
    rows = [
        (card.name, card.family, ",".join(sorted(card.capabilities)), ",".join(sorted(card.checkpoints())) or "-",
         card.system)
        for card in cards
    ]
    _echo_table(("model", "family", "capabilities", "weights", "system"), rows)
    click.echo("\nAlso: robustbench:<Name> (RobustBench zoo architecture, weights from --model-dir).")


@list_group.command("datasets")
def list_datasets_command() -> None:
    """Data sets that can be loaded (from local files; nothing is downloaded)."""
    from robusteval.data import DATASETS

    rows = [(info.name, str(info.num_classes), "×".join(map(str, info.input_shape)), getattr(info, "source", ""))
            for info in DATASETS.values()]
    _echo_table(("dataset", "classes", "shape", "source"), rows)
    click.echo("\nAlso: a path to an .npz file with arrays x (N,C,H,W or N,H,W,C) and y.")


@list_group.command("attacks")
@click.option("--json", "as_json", is_flag=True, help="Print the catalog as JSON.")
def list_attacks_command(as_json: bool) -> None:
    """Attacks and suites for `robusteval run --attack`: norms, source and published defaults."""
    from robusteval.attacks.catalog import ATTACKS

    if as_json:
        click.echo(json.dumps([{"name": s.name, "norms": list(s.norms), "source": s.source,
                                "description": s.description, "defaults": s.defaults, "members": list(s.members),
                                "white_box": s.white_box} for s in ATTACKS.values()], indent=2))
        return
    rows = [(s.name, ",".join(s.norms), s.source, s.defaults_text(), s.description) for s in ATTACKS.values()]
    _echo_table(("attack", "norms", "source", "defaults", "what"), rows)
    click.echo("\nRandomized defenses: attacks with their own EOT (eot-pgd, apgd-*, the suites' APGD) average "
               "--eot gradients;\nthe others attack the mean over --eot noise draws. --steps overrides iterations "
               "(Square: queries;\nsuites: APGD and FAB iterations).")


def _echo_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in (header, tuple("-" * w for w in widths), *rows):
        click.echo("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())


# --- train -----------------------------------------------------------------------------------
@main.command("train")
@click.option("--model", "model_name", required=True, help="Registered model name (see `robusteval list models`).")
@click.option("--dataset", default="digits", show_default=True, help="Training data set (name or .npz path).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory with the data set's files (mnist, fashion-mnist, cifar10); never downloaded.")
@click.option("--epochs", type=int, default=None, help="Epochs (default: the model card's recipe).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for every random draw of training.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the .safetensors (a .json record goes beside it). "
                   "Default: the shipped weights of the model zoo, which this command reproduces.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe option of the model card (repeatable), e.g. --option sigma=0.5.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_command(model_name: str, dataset: str, data_dir: Path | None, epochs: int | None, seed: int, out: Path | None,
                  options: tuple[str, ...], quiet: bool) -> None:
    """Train a model with its recipe, deterministically on the CPU, and write its weights and card record."""
    from robusteval.train_model import train_model

    result = train_model(model_name, dataset=dataset, epochs=epochs, seed=seed, out=out, progress=not quiet,
                         options=_parse_options(options), root=data_dir)
    metrics = ", ".join(f"{k} {v}" for k, v in result.record["metrics"].items())
    click.echo(f"wrote {result.weights} (sha256 {result.record['sha256'][:16]}...) in "
               f"{result.record['train_seconds']} s: {metrics}")


def _parse_options(options: tuple[str, ...]) -> dict[str, object]:
    parsed: dict[str, object] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {option!r}", param_hint="--option")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


# --- run (adversarial attacks) ----------------------------------------------------------------
def _parse_eps_list(value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        eps = [float(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers such as 0.05,0.1, got {value!r}",
                                 param_hint="--eps") from None
    if not eps:
        raise click.BadParameter("expected at least one eps", param_hint="--eps")
    return eps


@main.command("run")
@click.option("--model", "model_name", required=True,
              help="Registered model (see `robusteval list models`) or robustbench:<Name>.")
@click.option("--attack", default="autoattack", show_default=True, help="Attack or suite (see `robusteval list attacks`).")
@click.option("--dataset", default="digits", show_default=True, help="Data set (name or .npz path); test split.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory with the data set's files (mnist, fashion-mnist, cifar10); never downloaded.")
@click.option("--norm", default="Linf", show_default=True, help="Threat model: Linf or L2.")
@click.option("--eps", "eps_text", default=None, metavar="E1,E2,...",
              help="Radii to evaluate (default for digits: Linf 0.05,0.1,0.15,0.2,0.3; L2 0.25,0.5,1,1.5,2).")
@click.option("--n", type=int, default=None, help="Evaluate the first N test points (default: all).")
@click.option("--batch-size", type=int, default=500, show_default=True,
              help="Points attacked together; the state is saved after each eps of a batch, so a killed run "
                   "resumes from the last finished (batch, eps).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--defense", default="none", show_default=True,
              help="What is attacked: none | denoise:S | denoise:S:noise | noise:S | smooth:S:K.")
@click.option("--gradient", type=click.Choice(["full", "bpda", "auto"]), default=None,
              help="Gradients through a denoise defense: exact (full), identity backward (bpda), or both (auto, "
                   "the default for denoise defenses).")
@click.option("--eot", type=int, default=None,
              help="Noise draws per gradient against randomized defenses (default 20 there, else 1).")
@click.option("--steps", type=int, default=None, help="Override the attack's iterations (Square: queries).")
@click.option("--step-size", type=float, default=None, help="Override the step size of PGD-type attacks (CW: lr).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of every random draw; each batch's draws depend on it and the batch only.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory (default: runs/<model>-<dataset>-<attack>-<norm>-<config hash>, so the same "
                   "command resumes).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue a run directory holding the same configuration, or start it afresh.")
@click.option("--large-eps-check/--no-large-eps-check", default=True, show_default=True,
              help="Re-run the attack at a very large eps on up to 100 points (a gradient-masking check).")
@click.option("--masking-checks/--no-masking-checks", default=True, show_default=True,
              help="AutoAttack's randomness, softmax-output and dynamic-forward checks and the zero-gradient check "
                   "(one extra gradient pass at the clean points). Turn off only to time a bare attack.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print only the summary as JSON (the run path goes to stderr).")
@click.option("--model-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Weights directory for robustbench:<Name> models.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Load these weights instead of the shipped ones.")
@click.option("--allow-unsafe-pickle", is_flag=True,
              help="Allow arbitrary unpickling of a .pt checkpoint (only for files you trust).")
def run_command(model_name: str, attack: str, dataset: str, data_dir: Path | None, norm: str, eps_text: str | None,
                n: int | None, batch_size: int, device: str, defense: str, gradient: str | None, eot: int | None,
                steps: int | None, step_size: float | None, seed: int, out: Path | None, resume: bool,
                large_eps_check: bool, masking_checks: bool, quiet: bool, as_json: bool, model_dir: Path | None,
                checkpoint: Path | None, allow_unsafe_pickle: bool) -> None:
    """Adversarial robust accuracy over an eps list; writes a resumable run directory."""
    from robusteval.attacks.engine import prepare_attack
    from robusteval.runs import default_run_dir

    job = prepare_attack(model_name, dataset, attack=attack, norm=norm, eps=_parse_eps_list(eps_text), n=n,
                         batch_size=batch_size, device=device, defense=defense, gradient=gradient, eot=eot,
                         steps=steps, step_size=step_size, seed=seed, large_eps_check=large_eps_check,
                         masking_checks=masking_checks, checkpoint=checkpoint, model_dir=model_dir,
                         allow_unsafe_pickle=allow_unsafe_pickle, data_dir=data_dir)
    out = out or default_run_dir(job.config, job.run_dir_parts())
    click.echo(f"run directory: {out}", err=True)
    result = job.run(out=out, resume=resume, progress=not (quiet or as_json))
    summary = result.summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{summary['model']} on {summary['dataset']} ({summary['n']} points), {summary['attack']} "
               f"{summary['norm']}, defense {summary['defense']}"
               + (f", gradient {summary['gradient']}" if summary["defense"].startswith("denoise") else "")
               + (f", EOT {summary['eot']}" if summary["eot"] > 1 else "")
               + f": clean accuracy {summary['clean_accuracy']:.3f}")
    rows = [(f"{p['eps']:g}", f"{p['robust_accuracy']:.3f}", f"[{p['ci_low']:.3f}, {p['ci_high']:.3f}]",
             ", ".join(f"{k} {v}" for k, v in p["broken_by"].items()) or "-") for p in summary["curve"]]
    _echo_table(("eps", "robust acc", "95% CI", "broken by"), rows)
    for note in summary["notes"]:
        click.echo(f"note: {note}")
    if summary["flags"]:
        click.echo("flags (the numbers may overestimate robustness):")
        for flag in summary["flags"]:
            click.echo(f"  - {flag}")
    else:
        click.echo("flags: none")
    click.echo(f"{summary['seconds']:.1f} s; run: {out}")


# --- certify / predict (randomized smoothing) -----------------------------------------------
def _smoothing_options(function):
    """Options shared by `certify` and `predict`."""
    options = [
        click.option("--model", "model_name", required=True, help="Registered model name (see `robusteval list models`)."),
        click.option("--sigma", type=float, required=True, help="Std of the smoothing noise, in [0, 1] pixel units."),
        click.option("--mode", type=click.Choice(["direct", "denoised"]), default="direct", show_default=True,
                     help="direct: classify x + σn at σ; denoised: classify the model's denoise(x + σn, σ)."),
        click.option("--dataset", default="digits", show_default=True, help="Data set (name or .npz path); test split."),
        click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Directory with the data set's files (mnist, fashion-mnist, cifar10); never downloaded."),
        click.option("--alpha", type=float, default=0.001, show_default=True, help="Failure probability α."),
        click.option("--n-images", type=int, default=None, help="Number of test images (default: all after --skip)."),
        click.option("--skip", type=int, default=0, show_default=True, help="Start at this test image."),
        click.option("--batch-size", type=int, default=1000, show_default=True,
                     help="(image, noise draw) pairs per forward pass; draws of several images share a pass."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the noise; each image's draws depend on it and the image's index only."),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Run directory (default: runs/<kind>-<model>-...-<config hash>, so the same command resumes)."),
        click.option("--resume/--no-resume", default=True, show_default=True,
                     help="Continue a run directory holding the same configuration, or start it afresh."),
        click.option("--compile/--no-compile", "compile_model", default=None,
                     help="torch.compile the base classifier (static shapes). Default: when the run is long "
                          "enough for compiling to pay off."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (the run path goes to stderr)."),
        click.option("--model-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Weights directory for robustbench:<Name> models."),
        click.option("--checkpoint", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
                     help="Load these weights (.safetensors) instead of the shipped ones."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _run_smoothing_command(kind: str, options: dict[str, object]) -> None:
    from robusteval.certify.engine import (
        SmoothingSettings,
        model_dtype,
        require_capabilities,
        resolve_image_range,
        run_smoothing,
        smoothing_config,
    )
    from robusteval.data import load_dataset
    from robusteval.model_zoo.registry import create_model
    from robusteval.runs import RunDirectory, default_run_dir

    settings = SmoothingSettings(kind, sigma=options["sigma"], n=options["n"], alpha=options["alpha"],
                                 n0=options.get("n0", 0), mode=options["mode"], seed=options["seed"])
    data = load_dataset(options["dataset"], "test", root=options["data_dir"])
    model = create_model(options["model_name"], dataset=options["dataset"], device=options["device"],
                         checkpoint=options["checkpoint"], model_dir=options["model_dir"])
    require_capabilities(model, settings.mode)
    n_images, skip = resolve_image_range(len(data), options["n_images"], options["skip"])
    extra = {"checkpoint": str(options["checkpoint"]) if options["checkpoint"] else None,
             "model_dir": str(options["model_dir"]) if options["model_dir"] else None}
    config = smoothing_config(settings, model.name, data.name, n_images, skip, model.device, model.input_shape, extra,
                              dtype=model_dtype(model))
    out = options["out"] or default_run_dir(
        config, (kind, model.name, data.name, f"s{settings.sigma:g}", settings.mode))
    run_dir = RunDirectory(out, config, resume=options["resume"])
    verb = "resuming" if run_dir.resumed and run_dir.records else "writing"
    click.echo(f"{verb} {run_dir.path} ({len(run_dir.records)}/{n_images} images done)", err=True)
    result = run_smoothing(model, data, settings, n_images=n_images, skip=skip, batch_size=options["batch_size"],
                           compile=options["compile_model"], run_dir=run_dir, config=config,
                           progress=not options["quiet"])
    summary = result.summary
    if options["as_json"]:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"run: {run_dir.path}")
    if kind == "certify":
        curve = ", ".join(f"r={p['radius']:g}: {p['accuracy']:.3f}" for p in summary["certified_accuracy"])
        click.echo(f"certified accuracy ({summary['n_images']} images, σ={summary['sigma']:g}, {summary['mode']}): "
                   f"{curve}")
        click.echo(f"ACR {summary['acr']:.4f}, abstain rate {summary['abstain_rate']:.3f}, "
                   f"{summary['seconds']:.1f} s")
    else:
        click.echo(f"smoothed accuracy {summary['accuracy']:.3f}, abstain rate {summary['abstain_rate']:.3f} "
                   f"({summary['n_images']} images, σ={summary['sigma']:g}, {summary['mode']}), "
                   f"{summary['seconds']:.1f} s")


@main.command("certify")
@_smoothing_options
@click.option("--n0", type=int, default=100, show_default=True, help="Selection draws per image (pick the class).")
@click.option("--n", type=int, default=10_000, show_default=True, help="Estimation draws per image (bound its probability).")
def certify_command(**options: object) -> None:
    """Certified L2 radii by randomized smoothing (Cohen et al. 2019 CERTIFY); writes a run directory."""
    _run_smoothing_command("certify", options)


@main.command("predict")
@_smoothing_options
@click.option("--n", type=int, default=1000, show_default=True, help="Noise draws per image.")
def predict_command(**options: object) -> None:
    """The smoothed classifier's predictions, abstaining when not significant (Cohen et al. 2019 PREDICT)."""
    _run_smoothing_command("predict", options)


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
@click.option("--dataset", default="digits", show_default=True, help="Data set the model was trained on.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Load these weights (.safetensors) instead of the shipped ones.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("samples.png"), show_default=True,
              help="PNG file to write.")
def sample_command(model_name: str, n: int, class_index: int | None, conditional: bool, seed: int, dataset: str,
                   device: str, checkpoint: Path | None, out: Path) -> None:
    """Draw samples from a generative joint model and write them as a PNG grid.

    Also prints the `standard` baseline's mean confidence in the requested
    classes (or, for unconditional samples, in its own top class).
    """
    import torch

    from robusteval.checkpoints import CheckpointError
    from robusteval.interface import CapabilityError
    from robusteval.model_zoo.registry import create_model
    from robusteval.quality import sample_confidence
    from robusteval.reports.image_grids import save_sample_grid

    model = create_model(model_name, dataset=dataset, device=device, checkpoint=checkpoint)
    if "sample" not in model.capabilities:
        raise CapabilityError(model.name, "sample", model.capabilities)
    if class_index is not None and not conditional:
        raise ValueError("--class asks for class-conditional samples; it cannot be combined with --unconditional")
    if class_index is not None and not 0 <= class_index < model.num_classes:
        raise ValueError(f"--class must be a class index in [0, {model.num_classes}), got {class_index}")
    columns = 10
    rows = -(-n // columns)
    if class_index is not None:
        labels = torch.full((n,), class_index, dtype=torch.long)
        row_labels = [f"class {class_index}"] * rows
    elif conditional:
        labels = (torch.arange(n) // columns) % model.num_classes
        row_labels = [f"class {r % model.num_classes}" for r in range(rows)]
    else:
        labels, row_labels = None, None
    generator = torch.Generator().manual_seed(seed)
    samples = model.sample(n, None if labels is None else labels.to(model.device), generator=generator).cpu()
    kind = "unconditional" if labels is None else "class-conditional"
    save_sample_grid(samples, out, columns=columns, row_labels=row_labels,
                     title=f"{model.name}: {n} {kind} samples (seed {seed})")
    message = f"wrote {out}: {n} {kind} samples of {model.name}"
    try:
        standard = create_model("standard", dataset=dataset, device="cpu")
    except CheckpointError:
        standard = None  # no baseline weights for this data set: nothing to judge the samples with
    if standard is not None:
        message += f"; standard's mean confidence {sample_confidence(standard, samples, labels):.3f}"
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
@click.option("--dataset", default="digits", show_default=True, help="Data set (test split).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory with the data set's files (mnist, fashion-mnist, cifar10); never downloaded.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Load these weights (.safetensors) instead of the shipped ones.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("counterfactuals.png"),
              show_default=True, help="PNG file to write.")
def counterfactual_command(model_name: str, n: int, target: int | None, t_start: float | None, guidance: float | None,
                           seed: int, dataset: str, data_dir: Path | None, device: str, checkpoint: Path | None,
                           out: Path) -> None:
    """Visual counterfactual explanations: test digits changed to be classified as a target class.

    Writes originals above their counterfactuals, each captioned with the
    `standard` baseline's prediction, and prints how often that prediction
    flipped to the target and how far (L2) the counterfactuals moved.
    """
    import torch

    from robusteval.data import load_dataset
    from robusteval.interface import CapabilityError
    from robusteval.model_zoo.registry import create_model
    from robusteval.reports.image_grids import save_counterfactual_grid

    model = create_model(model_name, dataset=dataset, device=device, checkpoint=checkpoint)
    if not callable(getattr(model, "counterfactual", None)):
        raise CapabilityError(model.name, "counterfactual", model.capabilities)
    if target is not None and not 0 <= target < model.num_classes:
        raise ValueError(f"--target must be a class index in [0, {model.num_classes}), got {target}")
    data = load_dataset(dataset, "test", root=data_dir)
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data), generator=generator)[: min(n, len(data))]
    x, y = data.x[index], data.y[index]
    if target is None:
        shift = torch.randint(1, model.num_classes, y.shape, generator=generator)
        targets = (y + shift) % model.num_classes
    else:
        targets = torch.full_like(y, target)
    options = {k: v for k, v in (("t_start", t_start), ("guidance_scale", guidance)) if v is not None}
    changed = model.counterfactual(x.to(model.device), targets.to(model.device), generator=generator, **options).cpu()
    standard = create_model("standard", dataset=dataset, device="cpu")
    with torch.no_grad():
        before = standard.logits(x).softmax(1)
        after = standard.logits(changed).softmax(1)
    flipped = after.argmax(1) == targets
    distance = (changed - x).flatten(1).norm(dim=1)
    save_counterfactual_grid(
        x, changed,
        [f"y={int(a)} std:{int(p.argmax())} ({float(p.max()):.2f})" for a, p in zip(y, before)],
        [f"→{int(t)} std:{int(p.argmax())} ({float(p.max()):.2f})" for t, p in zip(targets, after)],
        out, title=f"{model.name} counterfactuals (seed {seed}); std = the standard baseline's prediction",
    )
    click.echo(f"wrote {out}: {len(y)} counterfactuals of {model.name}; standard predicts the target for "
               f"{int(flipped.sum())}/{len(y)} ({float(flipped.float().mean()):.0%}); mean L2 change "
               f"{float(distance.mean()):.3f}")


# --- report / check (reports and the CI gate) ------------------------------------------------
_REPORT_DEFAULT_OUT = {"html": "reports/leaderboard.html", "md": "reports/leaderboard.md",
                       "csv": "reports/leaderboard.csv", "latex": "reports/leaderboard.tex", "robustbench": "reports"}


def _parse_eps_overrides(values: tuple[str, ...]) -> dict[str, float]:
    overrides: dict[str, float] = {}
    for value in values:
        norm, sep, eps = value.partition("=")
        if not sep or norm not in ("Linf", "L2"):
            raise click.BadParameter(f"expected Linf=EPS or L2=EPS, got {value!r}", param_hint="--eps")
        try:
            overrides[norm] = float(eps)
        except ValueError:
            raise click.BadParameter(f"{eps!r} is not a number", param_hint="--eps") from None
    return overrides


def _parse_radii(value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        radii = [float(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated radii, got {value!r}", param_hint="--radii") from None
    if not radii or any(r < 0 for r in radii):
        raise click.BadParameter(f"expected non-negative radii, got {value!r}", param_hint="--radii")
    return radii


@main.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Main output file (a folder for robustbench). Default: reports/leaderboard.<ext> "
                   "(reports/ for robustbench). Figures and tables are written beside it.")
@click.option("--format", "fmt", type=click.Choice(["html", "md", "csv", "latex", "robustbench"]), default="html",
              show_default=True, help="Format of the main output.")
@click.option("--eps", "eps", multiple=True, metavar="NORM=EPS",
              help="Headline ε of the leaderboard for a norm (repeatable), e.g. --eps Linf=0.1 --eps L2=1.0. "
                   "Default: the data set's standard budget.")
@click.option("--radii", default=None, metavar="R1,R2",
              help="Radii of the leaderboard's certified-accuracy columns (default for digits: 0.5,1).")
@click.option("--title", default="robusteval leaderboard", show_default=True, help="Title of the HTML page.")
def report_command(runs: tuple[Path, ...], out: Path | None, fmt: str, eps: tuple[str, ...], radii: str | None,
                   title: str) -> None:
    """Figures, tables and a leaderboard from run directories (or folders of them, e.g. runs/)."""
    import shlex

    from robusteval.reports.loading import load_runs
    from robusteval.reports.report import write_report

    loaded = load_runs(runs)
    target = out or Path(_REPORT_DEFAULT_OUT[fmt])
    # The command that regenerates this report, from the parsed options (sys.argv is not ours under a runner).
    command = shlex.join(["robusteval", "report", *map(str, runs), "--out", str(target), "--format", fmt,
                          *[part for value in eps for part in ("--eps", value)],
                          *(["--radii", radii] if radii else [])])
    report = write_report(loaded, target, fmt, eps_overrides=_parse_eps_overrides(eps), radii=_parse_radii(radii),
                          command=command, title=title)
    click.echo(f"wrote {report.main} from {len(loaded)} runs; {len(report.figures.all())} figures "
               f"(PNG + SVG) in {report.figures.all()[0].svg.parent if report.figures.all() else '-'}; "
               f"tables in {next(iter(report.tables.files.values())).parent}")
    for path in report.extra:
        click.echo(f"wrote {path}")


@main.command("check")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--baseline", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Baseline JSON (robusteval-baseline/1; see robusteval.reports.check).")
@click.option("--alpha", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=0.05,
              show_default=True, help="Level of each one-sided test for a drop.")
@click.option("--update", is_flag=True, help="Rewrite the baseline from these runs (atomically) instead of checking.")
def check_command(runs: tuple[Path, ...], baseline: Path, alpha: float, update: bool) -> None:
    """Regression gate: exit 1 if a clean, robust or certified accuracy dropped significantly vs the baseline.

    Exit 2 when the comparison is not possible: a missing entry on either side or a changed configuration.
    """
    from robusteval.reports.check import compare, entries_from_runs, format_result, load_baseline, write_baseline
    from robusteval.reports.loading import load_runs

    loaded = load_runs(runs)
    if update:
        entries = write_baseline(loaded, baseline)
        figures = sum(len(e.figures) for e in entries.values())
        click.echo(f"wrote {baseline}: {len(entries)} entries, {figures} figures")
        return
    result = compare(entries_from_runs(loaded), load_baseline(baseline), alpha=alpha)
    click.echo(format_result(result), err=result.exit_code != 0)
    sys.exit(result.exit_code)


@main.command("benchmark")
@click.option("--suite", "suite_name", default="digits", show_default=True,
              help="digits (the leaderboard grid) or digits-ci (the CI-sized grid of reports/baseline.json).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True,
              help="Folder for run directories; the suite's runs go to <out>/<suite>/ (re-running resumes).")
@click.option("--report", "report_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Leaderboard written after the grid. Default: reports/leaderboard.html for the digits suite, "
                   "<out>/<suite>/report/leaderboard.html for others.")
@click.option("--no-report", is_flag=True, help="Only run the grid.")
@click.option("--models", "patterns", default="*", show_default=True,
              help="Comma-separated shell patterns of the zoo models to include.")
@click.option("--jobs", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Evaluations run in parallel processes (each single-threaded).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--n-attack", type=click.IntRange(1), default=None, help="Override: points per attack run.")
@click.option("--n-defense", type=click.IntRange(0), default=None,
              help="Override: points per adaptive-attack run on a joint model's pipeline (0: none).")
@click.option("--n-certify", type=click.IntRange(1), default=None, help="Override: images per certification run.")
@click.option("--n0", type=click.IntRange(1), default=None, help="Override: selection draws per image.")
@click.option("--n", "n_draws", type=click.IntRange(1), default=None, help="Override: estimation draws per image.")
def benchmark_command(suite_name: str, out: Path, report_out: Path | None, no_report: bool, patterns: str, jobs: int,
                      device: str, n_attack: int | None, n_defense: int | None, n_certify: int | None,
                      n0: int | None, n_draws: int | None) -> None:
    """Run a standard grid over the model zoo (attacks, adaptive attacks, certification, PSNR), then `report`."""
    import dataclasses

    from robusteval.benchmark import describe, resolve_suite, run_benchmark
    from robusteval.reports.loading import load_runs
    from robusteval.reports.report import write_report

    suite = resolve_suite(suite_name)
    overrides = {k: v for k, v in (("n_attack", n_attack), ("n_defense", n_defense), ("n_certify", n_certify),
                                   ("n0", n0), ("n", n_draws)) if v is not None}
    suite = dataclasses.replace(suite, **overrides)
    models = tuple(p.strip() for p in patterns.split(",") if p.strip()) or ("*",)
    result = run_benchmark(suite, out, models=models, jobs=jobs, device=device,
                           on_event=lambda message: click.echo(message, err=True))
    click.echo(f"suite {suite.name}: {len(result.finished)} runs finished, {len(result.failed)} failed, "
               f"{result.seconds:.0f} s; parameters and timings in {result.folder / 'benchmark.json'}")
    if not no_report and result.finished:
        target = report_out or (Path("reports/leaderboard.html") if suite.name == "digits"
                                else result.folder / "report" / "leaderboard.html")
        options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in overrides.items())
        command = (f"robusteval benchmark --suite {suite.name} --out {out}" + (f" --jobs {jobs}" if jobs > 1 else "")
                   + (f" {options}" if options else ""))
        runs = load_runs(result.finished)
        report = write_report(runs, target, command=command, title=f"robusteval leaderboard: {suite.name}",
                              notes=[describe(suite, sum(r.summary.get("seconds") or 0 for r in runs))])
        click.echo(f"wrote {report.main}")
    if result.failed:
        for label, error in sorted(result.failed.items()):
            click.echo(f"error: {label}: {error}", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
