"""The exact merge: finished shards of one run joined into the run directory the unsharded run writes.

`merge` checks that a set of finished shards is one run split N ways (same
configuration, every shard once) and writes one run directory equal to the
unsharded run: the records in index order, the summary recomputed from them
(times aside), the adversarial examples concatenated. What each kind of run
adds to that is its engine's `ShardMerger`; this module, above the engines,
holds the table of them (`MERGERS`), as torchmetrics' sync knows no metric.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robusteval.attacks.engine import ATTACK_MERGER
from robusteval.core.atomic_files import atomic_write_bytes
from robusteval.core.errors import UsageError
from robusteval.data import load_dataset
from robusteval.records.consistency import check_records, labels_lookup
from robusteval.runs.directory import (
    CONFIG_FILE,
    PROVENANCE_KEY,
    SAMPLES_FILE,
    RunConfigMismatch,
    RunDirectory,
    describe_differences,
    read_json_file,
)
from robusteval.runs.shards import SHARD_KEY, MergeRefused, ShardMerger, ShardRun
from robusteval.smoothing.engine import SMOOTHING_MERGER

# The merger of each kind of run that can be sharded (config.json's `kind`).
MERGERS: dict[str, ShardMerger] = {"attack": ATTACK_MERGER, "certify": SMOOTHING_MERGER, "predict": SMOOTHING_MERGER}


def _core(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration every shard of one run shares: no provenance, no shard; a device by its type."""
    core = {k: v for k, v in config.items() if k not in (PROVENANCE_KEY, SHARD_KEY)}
    if isinstance(core.get("device"), str):  # ranks run on cuda:0, cuda:1, ...: the same computation
        core["device"] = core["device"].split(":")[0]
    return core


@dataclass
class MergedRun:
    """The merged run: its configuration (the unsharded run's), records in index order, summary and files."""

    config: dict[str, Any]
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    files: dict[str, bytes]
    sources: list[str]
    label_check: str = ""  # whether the labels were checked against the data set's, and why not


def combine(shards: Sequence[ShardRun], data_dir: str | Path | None = None) -> MergedRun:
    """Check that `shards` are one finished run split N ways and combine them (nothing is written).

    Every record is checked against itself and its run, and its label against the data set's where the data
    set can be read here (`data_dir` for those read from a directory).
    """
    if not shards:
        raise MergeRefused("no shard directories given")
    for run in shards:
        if SHARD_KEY not in run.config:
            raise MergeRefused(f"{run.source} is not a shard (its config.json records no shard); merge takes the "
                               f"directories of `--shard I/N` runs")
    first = shards[0]
    core = _core(first.config)
    for run in shards[1:]:
        other = _core(run.config)
        if other != core:
            differ = describe_differences(core, other, str(first.source), str(run.source))
            raise MergeRefused(f"{first.source} and {run.source} are shards of different configurations (they "
                               f"{differ}); merge only the shards of one run")
    by_index: dict[int, ShardRun] = {}
    for run in shards:
        shard = run.shard
        if shard.count != first.shard.count:
            raise MergeRefused(f"{first.source} is shard {first.shard.label} but {run.source} is shard {shard.label}: "
                               f"splits into {first.shard.count} and {shard.count} shards overlap; merge the shards of "
                               f"one split")
        if shard.index in by_index:
            raise MergeRefused(f"shard {shard.label} is given twice ({by_index[shard.index].source} and "
                               f"{run.source}): their images overlap")
        by_index[shard.index] = run
    count = first.shard.count
    missing = [f"{i}/{count}" for i in range(1, count + 1) if i not in by_index]
    if missing:
        raise MergeRefused(f"shard(s) {', '.join(missing)} missing: the merged run would lack their images; give "
                           f"all {count} shard directories")
    ordered = [by_index[i] for i in range(1, count + 1)]
    for run in ordered:
        if run.summary is None:
            raise MergeRefused(f"{run.source} (shard {run.shard.label}) is unfinished: it has no summary.json "
                               f"({len(run.records)} images done); re-run its command to finish it")
    kind = str(core.get("kind"))
    merger = MERGERS.get(kind)
    if merger is None:
        raise MergeRefused(f"runs of kind {kind!r} cannot be merged (sharding applies to attack, certify and "
                           f"predict runs)")
    # The unsharded run's configuration (shard 1's device, as the unsharded run on that machine would record).
    config = {k: v for k, v in ordered[0].config.items() if k not in (SHARD_KEY, PROVENANCE_KEY)}
    expected = merger.index_range(config)
    for run in ordered:  # before anything is counted: a record that contradicts itself is refused
        merger.check_records(config, run)
    labels, label_check = _data_labels(config, expected, data_dir)
    if labels is not None:
        for run in ordered:
            check_records(Path(run.source) / SAMPLES_FILE, kind, config, run.records, data_labels=labels,
                          remedy="re-run that shard with --no-resume")
    records: list[dict[str, Any]] = []
    previous: tuple[ShardRun, range] | None = None
    for run in ordered:
        part = _images(run)
        if previous is not None and part.start != previous[1].stop:
            other, before = previous
            problem = ("overlap" if part.start < before.stop
                       else f"leave images {before.stop}..{part.start - 1} out")
            raise MergeRefused(f"{other.source} (shard {other.shard.label}) holds images {_span(before)} and "
                               f"{run.source} (shard {run.shard.label}) images {_span(part)}: they {problem}")
        records.extend(sorted(run.records, key=lambda r: r["index"]))
        previous = run, part
    if [r["index"] for r in records] != list(expected):
        raise MergeRefused(f"the shards hold images {records[0]['index']}..{records[-1]['index']}, the run "
                           f"{_span(expected)}")
    return MergedRun(config, records, merger.summary(config, ordered, records), merger.files(config, ordered),
                     [run.source for run in ordered], label_check)


def _data_labels(config: dict[str, Any], images: range, data_dir: str | Path | None
                 ) -> tuple[Callable[[int], int | None] | None, str]:
    """The labels of the run's images from its data set, where it can be read here, and what to say of it."""
    name = str(config.get("dataset"))
    try:
        data = load_dataset(name, "test", root=data_dir, limit=images.stop)
    except UsageError as error:
        return None, f"labels not checked against data set '{name}': {error}"
    return labels_lookup(data.y.tolist()), f"labels checked against data set '{name}'"


def _images(run: ShardRun) -> range:
    """The contiguous images a finished shard holds, each once (else a MergeRefused naming it)."""
    indices = sorted(r.get("index") for r in run.records if type(r.get("index")) is int)
    part = range(indices[0], indices[-1] + 1) if indices else range(0)
    if not indices or len(indices) != len(run.records) or indices != list(part):
        raise MergeRefused(f"{run.source} (shard {run.shard.label}) does not hold a contiguous range of images "
                           f"once each ({len(run.records)} records); re-run its command with --no-resume")
    return part


def _span(images: range) -> str:
    return f"{images.start}..{images.stop - 1}"


def write_merged(merged: MergedRun, out: str | Path) -> Path:
    """Write the merged run to `out`: a new directory, or one holding the same run (it is rewritten)."""
    out = Path(out)
    if any(Path(source).resolve() == out.resolve() for source in merged.sources):
        raise MergeRefused(f"--out {out} is one of the shards; write the merged run to another directory")
    # resume=True: a directory holding another run is refused, one holding this run is rewritten.
    try:
        run_dir = RunDirectory(out, merged.config, resume=True)
    except RunConfigMismatch:
        stored = read_json_file(Path(out) / CONFIG_FILE, "give another --out or remove it")
        stored = {k: v for k, v in stored.items() if k != PROVENANCE_KEY}
        raise MergeRefused(f"{out} holds another run ({describe_differences(stored, merged.config, str(out), 'merged')}"
                           f"); give another --out or remove it") from None
    with run_dir:
        for name, data in merged.files.items():
            atomic_write_bytes(run_dir.artifact(name), data)
        run_dir.replace_records(merged.records)
        run_dir.write_summary(merged.summary)
    return out


def merge(shard_dirs: Sequence[str | Path], out: str | Path, data_dir: str | Path | None = None) -> MergedRun:
    """Merge finished shard directories into one run directory at `out`, equal to the unsharded run."""
    merged = combine([ShardRun.read(path) for path in shard_dirs], data_dir)
    write_merged(merged, out)
    return merged
