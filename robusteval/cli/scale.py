"""Scale-out on the command line: `robusteval merge`, and torchrun ranks running shards (`robusteval.scale`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from robusteval.cli.group import main
from robusteval.cli.summaries import print_summary
from robusteval.core.errors import UsageError
from robusteval.scale.merge import merge
from robusteval.scale.ranks import Rank, gather_to_rank0, launched_rank


def torchrun_rank(options: dict[str, Any]) -> Rank | None:
    """Under torchrun: this rank's shard and device put into the command's options (None outside torchrun)."""
    rank = launched_rank()
    if rank is None:
        return None
    if options.get("shard") is not None:
        raise UsageError("under torchrun each rank runs shard RANK+1 of WORLD_SIZE; leave out --shard")
    options["shard"] = rank.shard.label
    device = options.get("device")
    options["device"] = rank.device(None if device is None else str(device))
    return rank


def run_paths(job: Any, out: Path | None, rank: Rank | None) -> tuple[Path, Path | None]:
    """Where the job writes and, under torchrun, where rank 0 writes the merged run.

    Under torchrun --out (or the unsharded run's default directory) names the merged run and each rank's
    shard goes beside it (<out>-shard<I>of<N>); otherwise the job writes to --out or its default directory.
    """
    if rank is None:
        return out or job.default_run_dir(), None
    default = job.default_run_dir()  # the shard's: the unsharded run's directory with the shard's suffix
    suffix = rank.shard.run_dir("x").name.removeprefix("x")
    merged = out or default.with_name(default.name.removesuffix(suffix))
    return rank.shard.run_dir(merged), merged


def merge_ranks(shard_dir: Path, merged_out: Path | None) -> dict[str, Any] | None:
    """Every rank's finished shard to rank 0, which merges them: the merged summary there, None elsewhere."""
    assert merged_out is not None
    merged = gather_to_rank0(shard_dir, merged_out)
    if merged is None:
        click.echo(f"shard done: {shard_dir}; rank 0 merges into {merged_out}", err=True)
        return None
    click.echo(f"merged {len(merged.sources)} shards into {merged_out}", err=True)
    return merged.summary


def summary_to_print(summary: dict[str, Any], out: Path, merged_out: Path | None,
                     rank: Rank | None) -> tuple[dict[str, Any] | None, Path]:
    """The summary this process prints and its run directory: its own run's, or under torchrun the merged
    run's on rank 0 (None on the other ranks, which print nothing more)."""
    if rank is None:
        return summary, out
    return merge_ranks(out, merged_out), merged_out or out


@main.command("merge")
@click.argument("shards", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The merged run directory (new, or one holding the same run).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory with the data set's files, to check every record's label against the data set's "
                   "(the embedded digits and an installed Fashion-MNIST need none).")
@click.option("--json", "as_json", is_flag=True, help="Print the merged summary as JSON.")
def merge_command(shards: tuple[Path, ...], out: Path, data_dir: Path | None, as_json: bool) -> None:
    """Merge the directories of `--shard I/N` runs into one run directory equal to the unsharded run.

    Refuses shards of different configurations, overlapping or missing shards, and unfinished shards.
    """
    merged = merge(shards, out, data_dir)
    if not as_json:
        click.echo(f"merged {len(shards)} shards ({len(merged.records)} records) into {out}; {merged.label_check}")
    print_summary(merged.summary, out, as_json)
