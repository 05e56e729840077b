"""Scale-out: a run split into shards over its images, the exact merge, and torchrun ranks as shards.

A shard `I/N` takes a fixed, contiguous run of the *unsharded* run's batches
(`Shard.batches`), so every image lands in the same batch with the same seed
as in the unsharded run, and each shard is an ordinary resumable run
directory whose config.json records the shard. `merge` checks that a set of
finished shards is one run split N ways (same configuration, every shard once)
and writes one run directory equal to the unsharded run: the records in index
order, the summary recomputed from them (times aside), the adversarial
examples concatenated. What each kind of run adds to that is its engine's
`ShardMerger` (`mergers`).

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) a command runs shard
RANK+1 of WORLD_SIZE on cuda:LOCAL_RANK (the CPU without CUDA); the finished
shards reach rank 0 through the process group (gloo, no shared filesystem
needed) and rank 0 merges them.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from robusteval.errors import UsageError

T = TypeVar("T")
SHARD_KEY = "shard"  # the config.json key of a shard run: "I/N"
_SHARD_PATTERN = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
# Files of a shard directory that are not part of the run (its lock, partial states of a running batch).
_SKIPPED_FILES = re.compile(r"^(\.lock|partial_.*|shard_batch.*)$")


class MergeRefused(UsageError):
    """Shard directories that do not make up one finished run."""


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (1 ≤ index ≤ count): one contiguous part of a run's batch plan."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 1 <= self.index <= self.count:
            raise UsageError(f"a shard is I/N with 1 <= I <= N, got {self.index}/{self.count}")

    @classmethod
    def parse(cls, value: str | Shard | None) -> Shard | None:
        """'I/N' (or a Shard, or None: the whole run)."""
        if value is None or isinstance(value, Shard):
            return value
        match = _SHARD_PATTERN.match(str(value))
        if match is None:
            raise UsageError(f"--shard takes I/N (e.g. 2/4, shard 2 of 4), got {value!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    def batches(self, n_batches: int) -> range:
        """This shard's batches of a plan of `n_batches`: the cut points floor(k·B/N), so sizes differ by ≤ 1."""
        if n_batches < self.count:
            raise UsageError(f"cannot split {n_batches} batch(es) into {self.count} shards: every shard needs at "
                             f"least one whole batch (use at most {n_batches} shards, or a smaller batch size)")
        return range((self.index - 1) * n_batches // self.count, self.index * n_batches // self.count)

    def items(self, total: int, per_batch: int) -> range:
        """The items (images) of this shard when `total` items are cut into batches of `per_batch`."""
        batches = self.batches(-(-total // per_batch))
        return range(batches.start * per_batch, min(total, batches.stop * per_batch))

    def pick(self, items: Sequence[T]) -> list[T]:
        """Every N-th item from the I-th: a list's share for this shard (a cost-sorted list stays balanced)."""
        return list(items[self.index - 1 :: self.count])

    def run_dir(self, merged: str | Path) -> Path:
        """Where this shard's directory goes beside the merged run's: <merged>-shard<I>of<N>."""
        merged = Path(merged)
        return merged.with_name(f"{merged.name}-shard{self.index}of{self.count}")

    def describe(self, what: str) -> str:
        """A progress bar's title naming the shard."""
        return f"{what} shard {self.label}"


def describe(what: str, shard: Shard | None) -> str:
    return shard.describe(what) if shard is not None else what


def with_shard(config: dict[str, Any], shard: Shard | None) -> dict[str, Any]:
    """A run's configuration with its shard recorded (the unsharded configuration unchanged)."""
    return config if shard is None else {**config, SHARD_KEY: shard.label}


# --- merge ---------------------------------------------------------------------------------
@dataclass
class ShardRun:
    """A finished shard: its configuration, summary, records and files (read from disk or sent by a rank)."""

    source: str  # where it came from, for messages
    config: dict[str, Any]
    summary: dict[str, Any] | None
    records: list[dict[str, Any]]
    files: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | Path) -> ShardRun:
        from robusteval.runs import CONFIG_FILE, SAMPLES_FILE, SUMMARY_FILE, read_json_file

        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise MergeRefused(f"{path} is not a run directory (no {CONFIG_FILE})")
        config = read_json_file(path / CONFIG_FILE, "re-run the shard's command with --no-resume")
        summary = (read_json_file(path / SUMMARY_FILE, "re-run the shard's command to recompute it")
                   if (path / SUMMARY_FILE).is_file() else None)
        records = []
        samples = path / SAMPLES_FILE
        if samples.is_file():
            for number, line in enumerate(samples.read_bytes().split(b"\n"), start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise MergeRefused(f"{samples} line {number} is damaged; re-run the shard's command to "
                                           f"resume it") from None
        files = {p.name: p.read_bytes() for p in sorted(path.iterdir())
                 if p.is_file() and p.name not in (CONFIG_FILE, SUMMARY_FILE, SAMPLES_FILE)
                 and not _SKIPPED_FILES.match(p.name)}
        return cls(str(path), config, summary, records, files)

    @property
    def shard(self) -> Shard:
        return Shard.parse(self.config[SHARD_KEY])  # type: ignore[return-value]

    def load_tensor(self, name: str) -> Any:
        import torch

        if name not in self.files:
            raise MergeRefused(f"{self.source} lacks {name}; re-run the shard's command to finish it")
        return torch.load(io.BytesIO(self.files[name]), map_location="cpu", weights_only=True)


class ShardMerger(Protocol):
    """What one kind of run adds to the merge: its index range, its summary and its files."""

    def index_range(self, config: dict[str, Any]) -> range: ...

    def summary(self, config: dict[str, Any], shards: list[ShardRun],
                records: list[dict[str, Any]]) -> dict[str, Any]: ...

    def files(self, config: dict[str, Any], shards: list[ShardRun]) -> dict[str, bytes]: ...


def mergers() -> dict[str, ShardMerger]:
    """The merger of each kind of run that can be sharded (config.json's `kind`)."""
    from robusteval.attacks.engine import ATTACK_MERGER
    from robusteval.smoothing.engine import SMOOTHING_MERGER

    return {"attack": ATTACK_MERGER, "certify": SMOOTHING_MERGER, "predict": SMOOTHING_MERGER}


def _core(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration every shard of one run shares: no provenance, no shard; a device by its type."""
    from robusteval.runs import PROVENANCE_KEY

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


def combine(shards: Sequence[ShardRun]) -> MergedRun:
    """Check that `shards` are one finished run split N ways and combine them (nothing is written)."""
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
            differ = sorted(k for k in set(core) | set(other) if core.get(k) != other.get(k))
            raise MergeRefused(f"{first.source} and {run.source} are shards of different configurations (they "
                               f"differ in: {', '.join(differ)}); merge only the shards of one run")
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
    merger = mergers().get(kind)
    if merger is None:
        raise MergeRefused(f"runs of kind {kind!r} cannot be merged (sharding applies to attack, certify and "
                           f"predict runs)")
    from robusteval.runs import PROVENANCE_KEY

    # The unsharded run's configuration (shard 1's device, as the unsharded run on that machine would record).
    config = {k: v for k, v in ordered[0].config.items() if k not in (SHARD_KEY, PROVENANCE_KEY)}
    expected = merger.index_range(config)
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
                     [run.source for run in ordered])


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
    from robusteval.runs import RunConfigMismatch, RunDirectory

    out = Path(out)
    if any(Path(source).resolve() == out.resolve() for source in merged.sources):
        raise MergeRefused(f"--out {out} is one of the shards; write the merged run to another directory")
    from robusteval.checkpoints import atomic_write_bytes

    # resume=True: a directory holding another run is refused, one holding this run is rewritten.
    try:
        run_dir = RunDirectory(out, merged.config, resume=True)
    except RunConfigMismatch as error:
        differs = re.search(r"differs in: [^)]*", str(error))
        raise MergeRefused(f"{out} holds another run ({differs.group(0) if differs else 'another configuration'}); "
                           f"give another --out or remove it") from None
    with run_dir:
        for name, data in merged.files.items():
            atomic_write_bytes(run_dir.artifact(name), data)
        run_dir.replace_records(merged.records)
        run_dir.write_summary(merged.summary)
    return out


def merge(shard_dirs: Sequence[str | Path], out: str | Path) -> MergedRun:
    """Merge finished shard directories into one run directory at `out`, equal to the unsharded run."""
    merged = combine([ShardRun.read(path) for path in shard_dirs])
    write_merged(merged, out)
    return merged


# --- torchrun ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rank:
    """This process's place in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def shard(self) -> Shard:
        return Shard(self.rank + 1, self.world_size)

    def device(self, requested: str | None) -> str:
        """cuda:LOCAL_RANK when CUDA is there and no explicit device was asked for (auto), else as asked."""
        import torch

        if requested in (None, "auto", "cuda"):
            if torch.cuda.is_available():
                return f"cuda:{self.local_rank % torch.cuda.device_count()}"
            return "cpu" if requested != "cuda" else "cuda"
        return str(requested)


def launched_rank() -> Rank | None:
    """The torchrun rank of this process (None outside torchrun or with one process)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UsageError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world <= 1:
        return None
    return Rank(rank, world, local)


def start_group(timeout_hours: float = 72.0) -> None:
    """Join the process group (gloo: it carries Python objects on CPU and GPU machines alike).

    The timeout is long because ranks meet again only when every shard is done; torchrun itself ends the
    others when one dies.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=_dt.timedelta(hours=timeout_hours))


def gather_to_rank0(shard_dir: str | Path, out: str | Path) -> MergedRun | None:
    """Send this rank's finished shard to rank 0, which merges all of them into `out` (others get None)."""
    import torch.distributed as dist

    start_group()
    run = ShardRun.read(shard_dir)
    gathered: list[ShardRun | None] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(run, gathered, dst=0)
    merged = None
    if dist.get_rank() == 0:
        merged = combine([r for r in gathered if r is not None])  # type: ignore[union-attr]
        write_merged(merged, out)
    dist.barrier()
    dist.destroy_process_group()
    return merged


def wait_for_ranks() -> bool:
    """Wait until every rank gets here; True on rank 0 (which then reports for all)."""
    import torch.distributed as dist

    start_group()
    dist.barrier()
    first = dist.get_rank() == 0
    dist.destroy_process_group()
    return first
