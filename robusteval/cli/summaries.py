"""What run, certify, predict and merge print at the end: the summary of a run, as text or JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from robusteval.cli.options import echo_table


def print_summary(summary: dict[str, Any] | None, path: Path, as_json: bool) -> None:
    """The summary of the run at `path`, as JSON or text (nothing for None: torchrun's ranks other than 0)."""
    if summary is None:
        return
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif summary["kind"] == "attack":
        echo_attack_summary(summary)
        click.echo(f"{summary['seconds']:.1f} s; run: {path}")
    else:
        echo_smoothing_summary(summary, path)


def echo_attack_summary(summary: dict[str, Any]) -> None:
    click.echo(f"{summary['model']} on {summary['dataset']} ({summary['n']} points), {summary['attack']} "
               f"{summary['norm']}, defense {summary['defense']}"
               + (f", gradient {summary['gradient']}" if summary["defense"].startswith(("denoise", "sgld", "purify")) else "")
               + (f", EOT {summary['eot']}" if summary["eot"] > 1 else "")
               + f": clean accuracy {summary['clean_accuracy']:.3f}")
    rows = [(f"{p['eps']:g}", f"{p['robust_accuracy']:.3f}", f"[{p['ci_low']:.3f}, {p['ci_high']:.3f}]",
             _figure(p.get("standard_robust_accuracy")), _figure(p.get("worst_of_n_robust_accuracy")),
             ", ".join(f"{k} {v}" for k, v in p["broken_by"].items()) or "-") for p in summary["curve"]]
    echo_table(("eps", "robust acc", "95% CI", f"{summary['attack']} alone", "worst-of-N", "broken by"), rows)
    for note in summary["notes"]:
        click.echo(f"note: {note}")
    if summary["flags"]:
        click.echo("flags (the numbers may overestimate robustness):")
        for flag in summary["flags"]:
            click.echo(f"  - {flag}")
    else:
        click.echo("flags: none")


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def echo_smoothing_summary(summary: dict[str, Any], path: Path) -> None:
    kind = summary["kind"]
    click.echo(f"run: {path}")
    if kind == "certify":
        curve = ", ".join(f"r={p['radius']:g}: {p['accuracy']:.3f}" for p in summary["certified_accuracy"])
        click.echo(f"certified accuracy ({summary['n_images']} images, σ={summary['sigma']:g}, {summary['mode']}) "
                   f"of {summary['model']}: {curve}")
        click.echo(f"ACR {summary['acr']:.4f}, abstain rate {summary['abstain_rate']:.3f}, "
                   f"{summary['seconds']:.1f} s")
        if summary.get("method") == "sequential":
            draws = summary["draws_per_image"]
            click.echo(f"draws per image: mean {draws['mean']:.0f}, median {draws['median']:.0f}, max {draws['max']} "
                       f"(n_max {summary['n_max']}); {summary['forward_passes']} forward passes in all")
    else:
        click.echo(f"{summary['model']}: smoothed accuracy {summary['accuracy']:.3f}, abstain rate {summary['abstain_rate']:.3f} "
                   f"({summary['n_images']} images, σ={summary['sigma']:g}, {summary['mode']}), "
                   f"{summary['seconds']:.1f} s")
