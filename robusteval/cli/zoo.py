"""`robusteval list` and `robusteval train`: what the zoo holds and how its weights are reproduced."""

from __future__ import annotations

import json
from pathlib import Path

import click

from robusteval.attacks.catalog import ATTACKS
from robusteval.cli.group import main
from robusteval.cli.options import echo_table
from robusteval.core.preflight import check_writable_file
from robusteval.data import DATASETS
from robusteval.model_zoo.factory import list_models, model_card
from robusteval.model_zoo.train_model import train_model


# --- list ------------------------------------------------------------------------------------
@main.group("list")
def list_group() -> None:
    """List what robusteval knows: models, datasets, attacks."""


@list_group.command("models")
@click.option("--filter", "pattern", default="*", show_default=True, help="Shell-style pattern on model names.")
@click.option("--json", "as_json", is_flag=True, help="Print the model cards as JSON.")
def list_models_command(pattern: str, as_json: bool) -> None:
    """The model zoo: name, family, capabilities and shipped weights."""
    cards = [model_card(name) for name in list_models(pattern)]
    if as_json:
        click.echo(json.dumps([card.as_dict() for card in cards], indent=2))
        return
    rows = [
        (card.name, card.family, ",".join(sorted(card.capabilities)), ",".join(sorted(card.checkpoints())) or "-",
         card.system)
        for card in cards
    ]
    echo_table(("model", "family", "capabilities", "weights", "system"), rows)
    click.echo("\nAlso: robustbench:<Name> (RobustBench zoo architecture, weights from --model-dir).")


@list_group.command("datasets")
def list_datasets_command() -> None:
    """Data sets that can be loaded (from local files; nothing is downloaded)."""
    rows = [(info.name, str(info.num_classes), "×".join(map(str, info.input_shape)), getattr(info, "source", ""))
            for info in DATASETS.values()]
    echo_table(("dataset", "classes", "shape", "source"), rows)
    click.echo("\nAlso: a path to an .npz file with arrays x (N,C,H,W or N,H,W,C) and y.")


@list_group.command("attacks")
@click.option("--json", "as_json", is_flag=True, help="Print the catalog as JSON.")
def list_attacks_command(as_json: bool) -> None:
    """Attacks and suites for `robusteval run --attack`: norms, source and published defaults."""
    if as_json:
        click.echo(json.dumps([{"name": s.name, "norms": list(s.norms), "source": s.source,
                                "description": s.description, "defaults": s.defaults, "members": list(s.members),
                                "white_box": s.white_box} for s in ATTACKS.values()], indent=2))
        return
    rows = [(s.name, ",".join(s.norms), s.source, s.defaults_text(), s.description) for s in ATTACKS.values()]
    echo_table(("attack", "norms", "source", "defaults", "what"), rows)
    click.echo("\nRandomized defenses: attacks with their own EOT (eot-pgd, apgd-*, the suites' APGD) average "
               "--eot gradients;\nthe others attack the mean over --eot noise draws. --steps overrides iterations "
               "(Square: queries;\nsuites: APGD and FAB iterations).")


# --- train -----------------------------------------------------------------------------------
@main.command("train")
@click.option("--model", "model_name", required=True, help="Registered model name (see `robusteval list models`).")
@click.option("--dataset", default="digits", show_default=True, help="Training data set (name or .npz path).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory with the data set's files (mnist, fashion-mnist, cifar10); never downloaded.")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Epochs (default: the model card's recipe).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for every random draw of training.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the .safetensors (a .json record goes beside it). "
                   "Default: the shipped weights of the model zoo, which this command reproduces.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe option of the model card (repeatable), e.g. --option sigma=0.5.")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda or cuda:N. CPU training is bit-for-bit reproducible on one CPU family; see README.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_command(model_name: str, dataset: str, data_dir: Path | None, epochs: int | None, seed: int, out: Path | None,
                  options: tuple[str, ...], device: str, quiet: bool) -> None:
    """Train a model with its recipe (deterministically: one CPU thread, or deterministic GPU algorithms) and
    write its weights and card record."""
    if out is not None:
        check_writable_file(out, "weights file")  # before training, not after it
    result = train_model(model_name, dataset=dataset, epochs=epochs, seed=seed, out=out, progress=not quiet,
                         options=_parse_options(options), root=data_dir, device=device)
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
