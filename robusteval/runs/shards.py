"""A run split into shards over its images: what a shard is, and a finished shard read back.

A shard `I/N` takes a fixed, contiguous run of the *unsharded* run's batches
(`Shard.batches`), so every image lands in the same batch with the same seed
as in the unsharded run, and each shard is an ordinary resumable run
directory whose config.json records the shard. Each engine declares how its
shards combine (a `ShardMerger`); `robusteval.scale.merge` joins them.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from robusteval.core.errors import UsageError
from robusteval.runs.directory import (
    CONFIG_FILE,
    SAMPLES_FILE,
    SUMMARY_FILE,
    read_json_file,
)

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

    def title(self, what: str) -> str:
        """A progress bar's title naming the shard."""
        return f"{what} shard {self.label}"


def shard_title(what: str, shard: Shard | None) -> str:
    """A progress bar's title: `what`, naming the shard when there is one."""
    return shard.title(what) if shard is not None else what


def with_shard(config: dict[str, Any], shard: Shard | None) -> dict[str, Any]:
    """A run's configuration with its shard recorded (the unsharded configuration unchanged)."""
    return config if shard is None else {**config, SHARD_KEY: shard.label}


# --- a finished shard -----------------------------------------------------------------------
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
        if name not in self.files:
            raise MergeRefused(f"{self.source} lacks {name}; re-run the shard's command to finish it")
        return torch.load(io.BytesIO(self.files[name]), map_location="cpu", weights_only=True)


class ShardMerger(Protocol):
    """What one kind of run adds to the merge: its index range, its record checks, its summary and its files."""

    def index_range(self, config: dict[str, Any]) -> range: ...

    def check_records(self, config: dict[str, Any], shard: ShardRun) -> None:
        """Refuse (one line, naming the file, line and field) a record of `shard` that contradicts itself."""

    def summary(self, config: dict[str, Any], shards: list[ShardRun],
                records: list[dict[str, Any]]) -> dict[str, Any]: ...

    def files(self, config: dict[str, Any], shards: list[ShardRun]) -> dict[str, bytes]: ...
