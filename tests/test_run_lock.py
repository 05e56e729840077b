"""One writer per run directory: the lock refuses or waits for another process, and dies with its holder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from robusteval.runs import SAMPLES_FILE, RunDirectory, RunRecordsInvalid
from robusteval.runs.lock import LOCK_FILE, RunDirectoryBusy, RunLock, describe_holder

CONFIG = {"kind": "test", "n": 6, "batch_size": 3}

HOLDER = """
import sys, time
from robusteval.runs.lock import RunLock
lock = RunLock(sys.argv[1])
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _hold(directory: Path, seconds: float = 120.0) -> subprocess.Popen:
    """Another process holding the directory's lock (until it sleeps out or is killed)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), str(seconds)], env=env,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_process_is_refused_naming_the_holder_until_the_holder_is_killed(tmp_path: Path) -> None:
    holder = _hold(tmp_path)
    try:
        with pytest.raises(RunDirectoryBusy) as refused:
            RunDirectory(tmp_path, CONFIG)
        message = str(refused.value)
        assert f"process {holder.pid}" in message and str(tmp_path) in message and "--wait" in message
        assert "\n" not in message
        assert not (tmp_path / "config.json").exists()  # refused before writing anything
        info = json.loads((tmp_path / LOCK_FILE).read_text())
        assert info["pid"] == holder.pid and "-c" in info["command"]
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up runs: the OS drops the lock
        holder.wait()
    with RunDirectory(tmp_path, CONFIG) as run:
        assert (tmp_path / "config.json").exists() and run.records == []
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_wait_blocks_until_the_holder_ends(tmp_path: Path) -> None:
    holder = _hold(tmp_path, seconds=1.5)
    heard: list[str] = []
    started = time.monotonic()
    try:
        with RunDirectory(tmp_path, CONFIG, wait=True, on_wait=heard.append):
            waited = time.monotonic() - started
            # We got the lock only as the holder ended (its exit closes the lock's file before it is reaped).
            assert holder.wait(timeout=10) == 0
    finally:
        holder.kill()
        holder.wait()
    assert waited > 1.0  # the holder slept 1.5 s after taking the lock
    assert len(heard) == 1 and f"process {holder.pid}" in heard[0]


def test_one_process_cannot_open_a_directory_twice_and_close_releases_it(tmp_path: Path) -> None:
    first = RunDirectory(tmp_path, CONFIG)
    with pytest.raises(RunDirectoryBusy, match=f"process {os.getpid()}"):
        RunDirectory(tmp_path, CONFIG)
    first.close()
    first.close()  # idempotent
    RunDirectory(tmp_path, CONFIG).close()


def test_threads_racing_for_one_directory_get_exactly_one_writer(tmp_path: Path) -> None:
    outcomes: list[str] = []
    barrier = threading.Barrier(4)
    locks: list[RunLock] = []

    def take() -> None:
        barrier.wait()
        try:
            locks.append(RunLock(tmp_path))
            outcomes.append("locked")
        except RunDirectoryBusy:
            outcomes.append("busy")

    threads = [threading.Thread(target=take) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["busy", "busy", "busy", "locked"]
    locks[0].release()


def test_a_holder_that_died_before_writing_is_not_named(tmp_path: Path) -> None:
    # The file still names an earlier holder whose process is gone: say "another process", not a wrong pid.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import platform

    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(gone.stdout), "host": platform.node()}))
    assert describe_holder(tmp_path / LOCK_FILE) == "another process"


# --- what the lock prevents, checked on resume: records two writers would leave --------------------------------
def _batch(batch: int, indices: list[int]) -> list[dict]:
    return [{"index": i, "label": 0} for i in indices]


def test_resume_refuses_duplicate_records_naming_the_file_and_first_bad_line(tmp_path: Path) -> None:
    with RunDirectory(tmp_path, CONFIG) as run:
        run.append_batch(0, _batch(0, [0, 1, 2]))
        run.append_batch(0, _batch(0, [0, 1, 2]))  # a second process's copy of the same batch
    with RunDirectory(tmp_path, CONFIG) as run:
        with pytest.raises(RunRecordsInvalid) as refused:
            run.check_records(range(6))
    message = str(refused.value)
    assert f"{tmp_path / SAMPLES_FILE} line 4:" in message
    assert "image 0 is recorded twice" in message and "--no-resume" in message


@pytest.mark.parametrize("indices, line, problem", [
    ([0, 1, 7], 3, "image 7 lies outside the configured images 0..5"),
    ([0, 2, 1], 2, "image 2 where image 1 was expected"),
])
def test_resume_refuses_records_outside_the_configured_images(tmp_path: Path, indices: list[int], line: int,
                                                               problem: str) -> None:
    with RunDirectory(tmp_path, CONFIG) as run:
        run.append_batch(0, _batch(0, indices))
    with RunDirectory(tmp_path, CONFIG) as run:
        with pytest.raises(RunRecordsInvalid, match=rf"line {line}: {problem}"):
            run.check_records(range(6), in_order=True)


def test_an_engine_check_names_the_record_it_rejects(tmp_path: Path) -> None:
    with RunDirectory(tmp_path, CONFIG) as run:
        run.append_batch(0, _batch(0, [0, 1, 2]))
        run.append_batch(1, [{"index": 3, "label": 9}, {"index": 4, "label": 0}, {"index": 5, "label": 0}])
        run.check_records(range(6))  # fine without the engine's own check
        with pytest.raises(RunRecordsInvalid, match="line 4: label 9 is not a class"):
            run.check_records(range(6), check=lambda r: "label 9 is not a class" if r["label"] == 9 else None)


def test_blank_lines_do_not_shift_the_line_named(tmp_path: Path) -> None:
    with RunDirectory(tmp_path, CONFIG) as run:
        run.append_batch(0, _batch(0, [0, 1, 2]))
    samples = tmp_path / SAMPLES_FILE
    lines = samples.read_text().splitlines(keepends=True)
    samples.write_text("\n" + lines[0] + "\n" + "".join(lines[1:]) + lines[0].replace('"batch": 0', '"batch": 1')
                       .replace('"batch_records": 3', '"batch_records": 1'))
    with RunDirectory(tmp_path, CONFIG) as run:
        with pytest.raises(RunRecordsInvalid, match="line 4: image 0 is recorded twice"):
            run.check_records(range(6))
