"""Run directories: resumable per-batch records, atomic summaries, stable default paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from robusteval.runs import (
    CONFIG_FILE,
    SAMPLES_FILE,
    SUMMARY_FILE,
    RunConfigMismatch,
    RunDirectory,
    default_run_dir,
    read_run,
)
from robusteval.runs.lock import LOCK_FILE

CONFIG = {"command": "run", "model": "standard", "attack": "pgd", "eps": [0.05, 0.1], "seed": 0, "batch_size": 3}


def batch_records(batch: int, size: int = 3) -> list[dict]:
    return [{"index": batch * size + i, "label": i, "robust": {"0.05": True, "0.1": i % 2 == 0}} for i in range(size)]


def encoded_batch(batch: int, records: list[dict]) -> bytes:
    """The bytes append_batch writes for a batch: one JSON line per record, stamped with the batch."""
    return b"".join(
        (json.dumps({**r, "batch": batch, "batch_records": len(records)}) + "\n").encode() for r in records
    )


def test_new_run_writes_config_with_provenance(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run", CONFIG)
    assert not run.resumed
    stored = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())
    assert {k: v for k, v in stored.items() if k != "provenance"} == CONFIG
    assert {"versions", "git_commit", "command", "created"} <= set(stored["provenance"])
    assert stored["provenance"]["versions"]["torch"] != "not installed"
    assert run.records == [] and run.completed_batches == 0


def test_append_and_resume(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path, CONFIG)
    run.append_batch(0, batch_records(0))
    run.append_batch(1, batch_records(1))
    run.close()  # one writer at a time (see the locking tests)
    resumed = RunDirectory(tmp_path, CONFIG)
    assert resumed.resumed
    assert resumed.completed_batches == 2
    assert [r["index"] for r in resumed.records] == list(range(6))
    assert resumed.records == run.records
    resumed.append_batch(2, batch_records(2))
    resumed.close()
    assert [r["index"] for r in RunDirectory(tmp_path, CONFIG).records] == list(range(9))


@pytest.mark.parametrize("cut", ["half the bytes", "a third of the bytes", "one whole line"])
def test_resume_drops_a_torn_last_batch(tmp_path: Path, cut: str) -> None:
    run = RunDirectory(tmp_path, CONFIG)
    run.append_batch(0, batch_records(0))
    run.append_batch(1, batch_records(1))
    samples = tmp_path / SAMPLES_FILE
    intact = samples.read_bytes()
    run.close()
    torn = encoded_batch(2, batch_records(2))
    length = {
        "half the bytes": len(torn) // 2,
        "a third of the bytes": len(torn) // 3,
        "one whole line": torn.index(b"\n") + 1,  # ends on a line boundary but the batch is short
    }[cut]
    with open(samples, "ab") as handle:  # what a kill in the middle of the write leaves behind
        handle.write(torn[:length])

    resumed = RunDirectory(tmp_path, CONFIG)
    assert resumed.completed_batches == 2
    assert [r["index"] for r in resumed.records] == list(range(6))
    assert samples.read_bytes() == intact  # the torn bytes are gone from disk too
    resumed.append_batch(2, batch_records(2))
    resumed.close()
    again = RunDirectory(tmp_path, CONFIG)
    assert [r["index"] for r in again.records] == list(range(9))
    assert all(json.loads(line) for line in samples.read_text().splitlines())


def test_config_mismatch_is_an_error_naming_the_keys(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path, CONFIG)
    run.append_batch(0, batch_records(0))
    run.close()
    with pytest.raises(RunConfigMismatch, match=r"differs in: eps, seed"):
        RunDirectory(tmp_path, {**CONFIG, "eps": [0.05], "seed": 1})
    # Provenance (time, host, versions) may change between a run and its resumption.
    same = RunDirectory(tmp_path, {**CONFIG, "provenance": {"host": "elsewhere"}})
    assert same.resumed and same.completed_batches == 1
    same.close()
    # --no-resume starts the directory afresh.
    fresh = RunDirectory(tmp_path, {**CONFIG, "seed": 1}, resume=False)
    assert not fresh.resumed and fresh.records == []
    assert not (tmp_path / SAMPLES_FILE).exists()
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["seed"] == 1


def test_a_file_in_the_way_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(NotADirectoryError):
        RunDirectory(tmp_path / "run", CONFIG)


def test_summary_is_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDirectory(tmp_path, CONFIG)
    path = run.write_summary({"robust_accuracy": 0.5})
    assert path == tmp_path / SUMMARY_FILE
    assert json.loads(path.read_text()) == {"robust_accuracy": 0.5}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process is stopped between writing and renaming

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        run.write_summary({"robust_accuracy": 0.25, "more": list(range(1000))})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"robust_accuracy": 0.5}  # the old summary, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE, CONFIG_FILE, SUMMARY_FILE]  # no temporary
    assert read_run(tmp_path)["summary"] == {"robust_accuracy": 0.5}


def test_atomic_files_get_the_permissions_of_the_records_file(tmp_path: Path) -> None:
    # The summary is written through a private temporary file; the result must be as readable as
    # samples.jsonl, which open() creates under the process's umask.
    run = RunDirectory(tmp_path, CONFIG)
    run.append_batch(0, batch_records(0))
    run.write_summary({"robust_accuracy": 0.5})
    mode = (tmp_path / SAMPLES_FILE).stat().st_mode & 0o777
    assert (tmp_path / SUMMARY_FILE).stat().st_mode & 0o777 == mode
    assert (tmp_path / CONFIG_FILE).stat().st_mode & 0o777 == mode


def test_read_run_needs_a_finished_run(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path, CONFIG)
    run.append_batch(0, batch_records(0))
    with pytest.raises(FileNotFoundError, match="summary.json is missing"):
        read_run(tmp_path)
    run.write_summary({"n": 3})
    finished = read_run(tmp_path)
    assert finished["config"]["model"] == "standard"
    assert [r["index"] for r in finished["records"]] == [0, 1, 2]


def test_default_run_dir_is_stable_per_configuration(tmp_path: Path) -> None:
    parts = ["run", "robustbench:Standard", "autoattack"]
    first = default_run_dir(CONFIG, parts, root=tmp_path)
    reordered = dict(reversed(list(CONFIG.items())))
    assert default_run_dir(reordered, parts, root=tmp_path) == first
    assert default_run_dir({**CONFIG, "provenance": {"created": "now"}}, parts, root=tmp_path) == first
    assert default_run_dir({**CONFIG, "seed": 1}, parts, root=tmp_path) != first
    assert default_run_dir({**CONFIG, "eps": [0.05, 0.2]}, parts, root=tmp_path) != first
    assert first.parent == tmp_path
    assert first.name.startswith("run-robustbench_Standard-autoattack-")
    assert "/" not in first.name and ":" not in first.name
