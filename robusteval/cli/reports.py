"""`robusteval report`, `check` and `benchmark`: figures, tables, the CI gate and the standard grid."""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

import click

from robusteval.benchmark import describe_suite, resolve_suite, run_benchmark
from robusteval.cli.group import main
from robusteval.cli.options import (
    DIGITS_RADII_HELP,
    echo_table,
    job_options,
    parse_number,
    parse_numbers,
)
from robusteval.cli.scale import torchrun_rank
from robusteval.core.errors import UsageError
from robusteval.core.preflight import check_writable_directory, check_writable_file
from robusteval.core.vocabulary import NORMS, REPORT_FORMATS
from robusteval.papers import PapersSuite, papers_table, run_papers
from robusteval.reports.loading import load_runs
from robusteval.reports.regression import (
    compare,
    entries_from_runs,
    format_result,
    load_baseline,
    write_baseline,
)
from robusteval.reports.report import write_report
from robusteval.scale.ranks import wait_for_ranks

# --- report / check (reports and the CI gate) ------------------------------------------------
# A folder for robustbench's model_info files; one leaderboard file for the others.
_REPORT_DEFAULT_OUT = {fmt: "reports" if fmt == "robustbench" else f"reports/leaderboard.{ {'latex': 'tex'}.get(fmt, fmt)}"
                       for fmt in REPORT_FORMATS}


def _parse_eps_overrides(values: tuple[str, ...]) -> dict[str, float]:
    overrides: dict[str, float] = {}
    for value in values:
        norm, sep, eps = value.partition("=")
        if not sep or norm not in NORMS:
            raise click.BadParameter(f"expected {' or '.join(f'{n}=EPS' for n in NORMS)}, got {value!r}",
                                     param_hint="--eps")
        try:
            overrides[norm] = parse_number(eps)
        except (ValueError, ZeroDivisionError):
            raise click.BadParameter(f"{eps!r} is not a number", param_hint="--eps") from None
    return overrides


@main.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Main output file (a folder for robustbench). Default: reports/leaderboard.<ext> "
                   "(reports/ for robustbench). Figures and tables are written beside it.")
@click.option("--format", "fmt", type=click.Choice(REPORT_FORMATS), default="html",
              show_default=True, help="Format of the main output.")
@click.option("--eps", "eps", multiple=True, metavar="NORM=EPS",
              help="Headline ε of the leaderboard for a norm (repeatable), e.g. --eps Linf=8/255 --eps L2=0.5. "
                   "Default: the data set's standard budget.")
@click.option("--radii", default=None, metavar="R1,R2",
              help=f"Radii of the leaderboard's certified-accuracy columns (default for digits: {DIGITS_RADII_HELP}).")
@click.option("--title", default="robusteval leaderboard", show_default=True, help="Title of the HTML page.")
def report_command(runs: tuple[Path, ...], out: Path | None, fmt: str, eps: tuple[str, ...], radii: str | None,
                   title: str) -> None:
    """Figures, tables and a leaderboard from run directories (or folders of them, e.g. runs/)."""
    loaded = load_runs(runs)
    target = out or Path(_REPORT_DEFAULT_OUT[fmt])
    # The command that regenerates this report, from the parsed options (sys.argv is not ours under a runner).
    command = shlex.join(["robusteval", "report", *map(str, runs), "--out", str(target), "--format", fmt,
                          *[part for value in eps for part in ("--eps", value)],
                          *(["--radii", radii] if radii else [])])
    report = write_report(loaded, target, fmt, eps_overrides=_parse_eps_overrides(eps), radii=parse_numbers(radii, "--radii", "0.5,1"),
                          command=command, title=title)
    click.echo(f"wrote {report.main} from {len(loaded)} runs; {len(report.figures.all())} figures "
               f"(PNG + SVG) in {report.figures.all()[0].svg.parent if report.figures.all() else '-'}; "
               f"tables in {next(iter(report.tables.files.values())).parent}")
    for path in report.extra:
        click.echo(f"wrote {path}")


@main.command("check")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--baseline", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Baseline JSON (robusteval-baseline/1; see robusteval.reports.regression).")
@click.option("--alpha", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=0.05,
              show_default=True, help="Level of each one-sided test for a drop.")
@click.option("--update", is_flag=True, help="Rewrite the baseline from these runs (atomically) instead of checking.")
def check_command(runs: tuple[Path, ...], baseline: Path, alpha: float, update: bool) -> None:
    """Regression gate: exit 1 if a clean, robust or certified accuracy dropped significantly vs the baseline.

    Exit 2 when the comparison is not possible: a missing entry on either side or a changed configuration.
    """
    loaded = load_runs(runs)
    if update:
        check_writable_file(baseline, "baseline file", option="--baseline")
        entries = write_baseline(loaded, baseline)
        figures = sum(len(e.figures) for e in entries.values())
        click.echo(f"wrote {baseline}: {len(entries)} entries, {figures} figures")
        return
    result = compare(entries_from_runs(loaded), load_baseline(baseline), alpha=alpha)
    click.echo(format_result(result), err=result.exit_code != 0)
    sys.exit(result.exit_code)


@main.command("benchmark")
@click.option("--suite", "suite_name", default="digits", show_default=True,
              help="digits (the leaderboard grid), digits-ci (the CI-sized grid of reports/baseline.json) or "
                   "papers (the papers' claims against their released checkpoints in --model-dir).")
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
@job_options
@click.option("--n-attack", type=click.IntRange(1), default=None, help="Override: points per attack run.")
@click.option("--n-defense", type=click.IntRange(0), default=None,
              help="Override: points per adaptive-attack run on a joint model's pipeline (0: none).")
@click.option("--n-certify", type=click.IntRange(1), default=None, help="Override: images per certification run.")
@click.option("--n0", type=click.IntRange(1), default=None, help="Override: selection draws per image.")
@click.option("--n", "--draws", "n_draws", type=click.IntRange(1), default=None,
              help="Override: estimation draws per image (--draws under torchrun).")
@click.option("--votes", type=click.IntRange(1), default=None,
              help="papers suite: K of the smoothed classifier smooth:σ:K that AutoAttack attacks (default 100).")
@click.option("--eot", type=click.IntRange(1), default=None,
              help="papers suite: EOT draws of the attacks (default: AutoAttack's own).")
@click.option("--steps", type=click.IntRange(1), default=None,
              help="papers suite: the attacks' iterations (default: AutoAttack's published settings; any other "
                   "value makes the AutoAttack column non-standard).")
@click.option("--large-eps-check/--no-large-eps-check", default=True, show_default=True,
              help="papers suite: re-attack at a very large ε (a gradient-masking check).")
def benchmark_command(suite_name: str, out: Path, report_out: Path | None, no_report: bool, patterns: str, jobs: int,
                      n_attack: int | None, n_defense: int | None, n_certify: int | None,
                      n0: int | None, n_draws: int | None, votes: int | None, eot: int | None, steps: int | None,
                      large_eps_check: bool, **options: object) -> None:
    """Run a standard grid over the model zoo (attacks, adaptive attacks, certification, PSNR), then `report`.

    The evaluation options (--device, --data-dir, ...) go to every run of the grid; --dataset replaces the
    suite's data set. `--suite papers --model-dir DIR --data-dir DIR` evaluates the papers' released
    checkpoints found in DIR against the claims on their model cards (see robusteval.papers).
    """
    check_writable_directory(out, "run folder")
    if suite_name == PAPERS_SUITE:
        papers = PapersSuite(n_images=n_certify, n0=n0, n=n_draws, attack_points=n_attack,
                             **{k: v for k, v in (("votes", votes), ("eot", eot), ("steps", steps)) if v is not None},
                             large_eps_check=large_eps_check)
        _run_papers_suite(papers, out, options)
        return
    if any(v is not None for v in (votes, eot, steps)):
        raise UsageError("--votes, --eot and --steps apply to --suite papers; the grid suites run their own settings")
    suite = resolve_suite(suite_name)
    overrides = {k: v for k, v in (("n_attack", n_attack), ("n_defense", n_defense), ("n_certify", n_certify),
                                   ("n0", n0), ("n", n_draws)) if v is not None}
    if not large_eps_check:
        overrides["large_eps_check"] = False
    suite = dataclasses.replace(suite, **overrides)
    models = tuple(p.strip() for p in patterns.split(",") if p.strip()) or ("*",)
    rank = torchrun_rank(options)  # under torchrun: rank r runs part r+1 of the suite's runs on cuda:LOCAL_RANK
    result = run_benchmark(suite, out, models=models, jobs=jobs,
                           on_event=lambda message: click.echo(message, err=True), **options)
    click.echo(f"suite {suite.name}: {len(result.finished)} runs finished, {len(result.failed)} failed, "
               f"{result.seconds:.0f} s; parameters and timings in {result.folder / 'benchmark.json'}")
    if rank is not None:
        # Rank 0 reports every finished run of the suite it can see (all of them on one machine or a shared
        # filesystem; otherwise copy the run folders together and run `robusteval report`).
        if not wait_for_ranks():
            sys.exit(1 if result.failed else 0)
        result.finished = [p for p in result.planned if (p / "summary.json").is_file()]
    if not no_report and result.finished:
        target = report_out or (Path("reports/leaderboard.html") if suite.name == "digits"
                                else result.folder / "report" / "leaderboard.html")
        override_flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in overrides.items())
        command = (f"robusteval benchmark --suite {suite.name} --out {out}" + (f" --jobs {jobs}" if jobs > 1 else "")
                   + (f" --shard {options['shard']}" if options.get("shard") and rank is None else "")
                   + (f" {override_flags}" if override_flags else ""))
        runs = load_runs(result.finished)
        report = write_report(runs, target, command=command, title=f"robusteval leaderboard: {suite.name}",
                              notes=[describe_suite(suite, sum(r.summary.get("seconds") or 0 for r in runs))])
        click.echo(f"wrote {report.main}")
    if result.failed:
        for label, error in sorted(result.failed.items()):
            click.echo(f"error: {label}: {error}", err=True)
        sys.exit(1)


PAPERS_SUITE = "papers"


def _run_papers_suite(suite: PapersSuite, out: Path, options: dict[str, object]) -> None:
    """The papers suite: each claim's row as it finishes, then the table (and where it is written)."""
    model_dir = options.pop("model_dir", None)
    if options.pop("dataset", "digits") != "digits":  # the flag's default; each claim names its data set
        raise UsageError("--suite papers evaluates each claim on its paper's data set; do not pass --dataset")
    if model_dir is None:
        raise UsageError("--suite papers needs --model-dir DIR, the folder with the papers' released checkpoints")
    rows, folder = run_papers(model_dir, out, suite, on_event=lambda message: click.echo(message, err=True),
                              **options)
    header, body = papers_table(rows)
    echo_table(header, body)
    measured = sum(1 for row in rows if row.status == "measured")
    missing = sum(1 for row in rows if row.status == "missing")
    click.echo(f"{measured} claims measured, {missing} without their checkpoint, "
               f"{len(rows) - measured - missing} failed; table and notes in {folder / 'papers.md'}")
    if any(row.status.startswith("failed") for row in rows):
        sys.exit(1)
