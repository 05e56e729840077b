"""What the commands share: the flags of every evaluation (`job_options`), tables and option parsers."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import click

from robusteval.core.vocabulary import NORMS
from robusteval.data import DATASETS
from robusteval.jobs import JobOptions


def numbers(values: tuple[float, ...] | list[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


# Help texts name the defaults of the embedded data set, read from its description.
DIGITS_EPS_HELP = "; ".join(f"{norm} {numbers(DATASETS['digits'].budgets.eps[norm])}" for norm in NORMS)
DIGITS_RADII_HELP = numbers(DATASETS["digits"].budgets.leaderboard_radii)


_FLAG_TYPES = {
    "text": None,
    "dir": click.Path(file_okay=False, path_type=Path),
    "file": click.Path(dir_okay=False, exists=True, path_type=Path),
}


def job_options(function):
    """Adds the flags of `robusteval.jobs.JobOptions` (model, weights, data, device) to an evaluation command.

    The one place to add an option to every evaluation command and API entry
    point is `JobOptions`; this decorator turns each of its fields into a flag.
    """
    for item in reversed(dataclasses.fields(JobOptions)):
        flag = item.metadata["cli"]
        if flag.kind == "flag":
            option = click.option(flag.name, item.name, is_flag=True, help=flag.help)
        elif flag.kind == "switch":  # --x/--no-x; unset (None) leaves the command's default
            option = click.option(f"{flag.name}/--no-{flag.name[2:]}", item.name, default=None, help=flag.help)
        else:
            option = click.option(flag.name, item.name, type=_FLAG_TYPES[flag.kind], default=flag.default,
                                  show_default=flag.default is not None, help=flag.help)
        function = option(function)
    return function


def split_job_options(params: dict[str, object]) -> tuple[dict[str, object], dict[str, object]]:
    """A command's parameters split into its own and the `JobOptions` ones."""
    names = {item.name for item in dataclasses.fields(JobOptions)}
    return ({k: v for k, v in params.items() if k not in names}, {k: v for k, v in params.items() if k in names})


RUN_OUT_HELP = "Run directory (default: runs/<{}>-<config hash>, so the same command resumes)."
RESUME_HELP = "Continue a run directory holding the same configuration, or start it afresh."
WAIT_OPTION = click.option(
    "--wait", is_flag=True,
    help="If another process is writing the run directory, wait for it to finish instead of stopping at once.")


def echo_err(message: str) -> None:
    """A progress message on stderr (stdout may be JSON)."""
    click.echo(message, err=True)


def echo_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in (header, tuple("-" * w for w in widths), *rows):
        click.echo("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())


def parse_number(text: str) -> float:
    """A number or a fraction of two numbers (`8/255`, as budgets are written); ValueError otherwise."""
    numerator, slash, denominator = text.strip().partition("/")
    if not slash:
        return float(numerator)
    return float(numerator) / float(denominator)  # ZeroDivisionError is a ValueError's sibling: caught below


def parse_numbers(value: str | None, flag: str, example: str) -> list[float] | None:
    """A comma-separated list of finite numbers >= 0, each a number or a fraction, e.g. `0.05,0.1` or
    `4/255,8/255` (None stays None)."""
    if value is None:
        return None
    try:
        numbers = [parse_number(part) for part in value.split(",") if part.strip()]
    except (ValueError, ZeroDivisionError):
        raise click.BadParameter(f"expected comma-separated numbers or fractions such as {example}, got {value!r}",
                                 param_hint=flag) from None
    if not numbers or any(not math.isfinite(x) or x < 0 for x in numbers):
        raise click.BadParameter(f"expected finite numbers >= 0 such as {example}, got {value!r}", param_hint=flag)
    return numbers
