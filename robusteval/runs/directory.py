"""A run on disk: config.json, samples.jsonl, summary.json (and artifacts).

    runs/<run-id>/
      config.json    the full resolved configuration, versions, seed, git commit
      samples.jsonl  one record per evaluated image, appended batch by batch
      summary.json   the aggregate figures, written atomically at the end

Records are appended one batch at a time with a single write and an fsync;
each record carries its batch number and the batch's size, so on resume a
batch cut short by a kill is recognised and dropped. A killed run loses at
most one batch and never leaves a corrupt file behind.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from robusteval.core.atomic_files import (
    DiskFullError,
    atomic_write_bytes,
    atomic_write_json,
    is_disk_full,
    write_all,
)
from robusteval.core.errors import MissingFileError, NotADirectoryUsageError, UsageError
from robusteval.core.preflight import make_directory
from robusteval.runs.lock import RunLock

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
# Provenance that may change between a run and its resumption without changing what is computed.
PROVENANCE_KEY = "provenance"


class RunConfigMismatch(UsageError, RuntimeError):
    """A run directory holds a different configuration than the one asked for."""


class RunFileDamaged(UsageError):
    """A file of a run directory that cannot be read (truncated, edited by hand, not JSON)."""


class RunRecordsInvalid(UsageError):
    """samples.jsonl holds records that cannot belong to this run (duplicates, indices out of range)."""


_CONFIG_DAMAGED = "re-run with --no-resume to start this run afresh, or use another --out"
_SUMMARY_DAMAGED = "re-run the run's command to recompute it from the records"


def _canonical(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def _without_placement(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored configuration less the device keys that configurations held before the device left them.

    Attack runs recorded `device`, smoothing runs `device_type`. Neither changes an attack's results, and
    smoothing noise drawn on the CPU is today's definition, so such runs resume on any device; a smoothing
    run whose noise was drawn by a CUDA generator keeps its `device_type` and is refused as a mismatch.
    """
    core = {k: v for k, v in stored.items() if k != "device"}
    if core.get("device_type") == "cpu":
        del core["device_type"]
    return core


# What a run's figures depend on besides its settings (robusteval.core.fingerprints).
FINGERPRINT_KEYS = ("model_fingerprint", "file_fingerprints")


def describe_differences(first: dict[str, Any], second: dict[str, Any], first_name: str, second_name: str) -> str:
    """The keys in which two configurations differ, as text; other weights or files are named with both
    fingerprints and the file, so the user sees which file changed behind its path."""
    changed = sorted(k for k in set(first) | set(second) if first.get(k) != second.get(k))
    parts = [f"differs in: {', '.join(changed)}"]
    weights = first.get("model_fingerprint"), second.get("model_fingerprint")
    if "model_fingerprint" in changed:
        if None in weights:
            older = first_name if weights[0] is None else second_name
            parts.append(f"the {older} run was written before weights were fingerprinted, so its records cannot be "
                         f"shown to come from these weights")
        else:
            source = second.get("checkpoint") or first.get("checkpoint") or "the shipped weights"
            parts.append(f"other weights: model_fingerprint {weights[0]} ({first_name}) and {weights[1]} "
                         f"({second_name}) for {source}")
    if "file_fingerprints" in changed:
        files_a, files_b = first.get("file_fingerprints") or {}, second.get("file_fingerprints") or {}
        for option in sorted(set(files_a) | set(files_b)):
            if files_a.get(option) != files_b.get(option):
                path = second.get(option) or first.get(option) or option
                parts.append(f"another --{option.replace('_', '-')} file {path}: fingerprint {files_a.get(option)} "
                             f"({first_name}) and {files_b.get(option)} ({second_name})")
    return "; ".join(parts)


def read_json_file(path: str | Path, remedy: str) -> dict[str, Any]:
    """A JSON object from a run file; a damaged file is a RunFileDamaged naming it and saying what to do."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunFileDamaged(f"{path} is damaged (not valid JSON: {error}); {remedy}") from None
    if not isinstance(value, dict):
        raise RunFileDamaged(f"{path} is damaged (a JSON {type(value).__name__}, not an object); {remedy}")
    return value


@functools.cache  # installed versions do not change within a process; looking them up costs ~10 ms
def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("robusteval", "torch", "torchattacks", "pyautoattack", "robustbench", "statsmodels"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def git_commit() -> str | None:
    """The commit of the robusteval checkout, if it is one (with '+dirty' for local changes)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def provenance() -> dict[str, Any]:
    """Versions, git commit, command line, host and time of this process."""
    return {
        "versions": dict(_versions()),  # a copy: the cached dict stays as it is
        "git_commit": git_commit(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        "host": platform.node(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def config_id(config: dict[str, Any]) -> str:
    """A short stable hash of a configuration (without provenance)."""
    canonical = json.dumps({k: v for k, v in config.items() if k != PROVENANCE_KEY}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:8]


def default_run_dir(config: dict[str, Any], parts: Iterable[str], root: str | Path = "runs") -> Path:
    """runs/<parts>-<hash of config>: the same command maps to the same directory, so it resumes."""
    slug = "-".join(str(p).replace("/", "_").replace(":", "_").replace(" ", "") for p in parts if p)
    return Path(root) / f"{slug}-{config_id(config)}"


class RunDirectory:
    """One run's directory; open it with the resolved configuration.

    Opening takes the directory's lock (`run_lock`): a second process on the
    same directory stops at once with RunDirectoryBusy, or waits with
    `wait=True`. The lock is held until `close()` (or the end of a `with`
    block, or of the process).
    """

    def __init__(self, path: str | Path, config: dict[str, Any], resume: bool = True, wait: bool = False,
                 on_wait: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.config = {k: v for k, v in config.items() if k != PROVENANCE_KEY}
        config_path = self.path / CONFIG_FILE
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryUsageError(f"run path {self.path} exists and is not a directory")
        make_directory(self.path, "run directory")
        # Before anything in it is read or written: one writer per directory.
        self._lock = RunLock(self.path, wait=wait, on_wait=on_wait)
        try:
            if config_path.exists() and resume:
                stored_core = _without_placement({k: v for k, v in read_json_file(config_path, _CONFIG_DAMAGED)
                                                  .items() if k != PROVENANCE_KEY})
                if _canonical(stored_core) != _canonical(self.config):
                    raise RunConfigMismatch(
                        f"{self.path} holds a run with a different configuration "
                        f"({describe_differences(stored_core, self.config, 'stored', 'now')})."
                        f" Use another --out, or --no-resume to start this directory afresh."
                    )
                self.resumed = True
            else:
                for name in (SAMPLES_FILE, SUMMARY_FILE):
                    (self.path / name).unlink(missing_ok=True)
                for artifact in self.path.glob("*.pt"):
                    artifact.unlink()
                atomic_write_json(config_path, {**self.config, PROVENANCE_KEY: provenance()})
                self.resumed = False
            self._records = self._load_complete_records()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the directory's lock (idempotent); the object must not write afterwards."""
        self._lock.release()

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- per-image records ----------------------------------------------------------
    def _load_complete_records(self) -> list[dict[str, Any]]:
        """Records of complete batches; rewrites the file without a torn last batch."""
        path = self.path / SAMPLES_FILE
        if not path.exists():
            return []
        raw = path.read_bytes()
        lines = raw.split(b"\n")
        records: list[dict[str, Any]] = []
        damaged: tuple[int, int] | None = None  # (line number, intact records after it)
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                # A torn write: everything after it is discarded (and computed again).
                damaged = (number, sum(1 for rest in lines[number:] if rest.strip()))
                break
        complete: list[dict[str, Any]] = []
        batch: list[dict[str, Any]] = []
        for record in records:
            if batch and record.get("batch") != batch[0].get("batch"):
                batch = []
            batch.append(record)
            if len(batch) == record.get("batch_records"):
                complete.extend(batch)
                batch = []
        if damaged is not None and damaged[1]:  # a torn last line is a killed write; one mid-file is damage
            dropped = len(records) - len(complete) + damaged[1]
            logger.warning("%s line %d is damaged (not valid JSON): %d intact records are dropped with it (%d after "
                           "it) and will be computed again", path, damaged[0], dropped, damaged[1])
        torn = bool(raw) and not raw.endswith(b"\n")
        # Blank lines are dropped too, so that record k is on line k + 1 (check_records names lines).
        if torn or len(complete) != len(records) or len(complete) != raw.count(b"\n"):
            self._rewrite(complete)
        return complete

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        atomic_write_bytes(self.path / SAMPLES_FILE, b"".join(_encode(r) for r in records))

    def check_records(self, indices: range, in_order: bool = False,
                      check: Callable[[dict[str, Any]], str | None] | None = None) -> None:
        """Refuse records that cannot belong to this run, naming samples.jsonl and the first bad line.

        Every record needs an integer `index` in `indices`, different from every
        other record's (two processes writing one directory leave duplicates);
        with `in_order` record k must be `indices[k]` (engines that append in
        order resume by counting); `check(record)` returns what else is wrong
        with a record for its engine, or None.
        """
        seen: set[int] = set()
        for k, record in enumerate(self._records):
            index = record.get("index")
            if not isinstance(index, int) or isinstance(index, bool):
                problem = f"the record has no integer index ({index!r})"
            elif index in seen:
                problem = f"image {index} is recorded twice (did two processes write this directory?)"
            elif index not in indices:
                problem = (f"image {index} lies outside the configured images "
                           f"{indices.start}..{indices.stop - 1}")
            elif in_order and index != indices[k]:
                problem = f"image {index} where image {indices[k]} was expected (records out of order)"
            else:
                problem = check(record) if check is not None else None
            if problem is not None:
                # After _load_complete_records the file holds exactly these records, one per line.
                raise RunRecordsInvalid(
                    f"{self.path / SAMPLES_FILE} line {k + 1}: {problem}; these records cannot be resumed. "
                    f"Re-run with --no-resume to start afresh, or use another --out")
            seen.add(index)

    @property
    def records(self) -> list[dict[str, Any]]:
        """Records of every completed batch, in order."""
        return list(self._records)

    @property
    def completed_batches(self) -> int:
        return len({r["batch"] for r in self._records})

    def append_batch(self, batch: int, records: list[dict[str, Any]]) -> None:
        """Append one batch's records durably, in one write."""
        stamped = [{**r, "batch": batch, "batch_records": len(records)} for r in records]
        data = b"".join(_encode(r) for r in stamped)
        path = self.path / SAMPLES_FILE
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            try:
                write_all(fd, data)
                os.fsync(fd)
            except OSError as error:
                os.ftruncate(fd, start)  # whole batches only: the resume then starts at this batch
                if is_disk_full(error):
                    raise DiskFullError(
                        f"no space left on device writing {path}: batch {batch} ({_records(len(records))}, "
                        f"{len(data):,} bytes) could not be saved; the file keeps the {_records(len(self._records))} "
                        f"of the batches before it ({start:,} bytes). Free space and run the same command again to "
                        f"resume from there") from None
                raise
        finally:
            os.close(fd)
        self._records.extend(stamped)

    def replace_records(self, records: list[dict[str, Any]]) -> None:
        """Replace samples.jsonl by `records` (already stamped with their batches), atomically: merge writes this."""
        self._rewrite(records)
        self._records = list(records)

    # --- results --------------------------------------------------------------------
    def write_summary(self, summary: dict[str, Any]) -> Path:
        path = self.path / SUMMARY_FILE
        atomic_write_json(path, summary)
        return path

    def artifact(self, name: str) -> Path:
        return self.path / name


def _records(count: int) -> str:
    return f"{count} record" + ("" if count == 1 else "s")


def _encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, default=_json_default) + "\n").encode()


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to a run record")


def read_run(path: str | Path) -> dict[str, Any]:
    """Load a finished run: its config, summary and records. A missing summary is an error.

    A damaged file is a RunFileDamaged naming the file (and the line, for samples.jsonl).
    """
    path = Path(path)
    summary_path = path / SUMMARY_FILE
    if not summary_path.is_file():
        raise MissingFileError(f"{path} is not a finished run: {SUMMARY_FILE} is missing")
    config_path = path / CONFIG_FILE
    samples_path = path / SAMPLES_FILE
    records = []
    if samples_path.exists():
        for number, line in enumerate(samples_path.read_bytes().split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise RunFileDamaged(f"{samples_path} line {number} is damaged (not valid JSON: {error}); "
                                     f"re-run the run's command to resume it (the damaged batch and those after it "
                                     f"are computed again)") from None
    return {
        "path": str(path),
        "config": read_json_file(config_path, _CONFIG_DAMAGED) if config_path.exists() else {},
        "summary": read_json_file(summary_path, _SUMMARY_DAMAGED),
        "records": records,
    }
