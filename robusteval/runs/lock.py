"""One writer per run directory: an advisory lock on `<run dir>/.lock`.

Two processes appending to one `samples.jsonl` interleave their batches and
leave duplicate records that a later resume would summarise as if they were
more data. The writer of a run directory therefore holds an exclusive
`fcntl.flock` on a lock file inside it for as long as it works there. The
operating system releases the lock when the process ends, however it ends
(SIGKILL included), so a lock can never be left stale; the file itself stays
(removing it would let a third process lock a different file of the same name).

The holder writes its pid, host, command and start time into the file, so a
second process can say who is in its way.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from robusteval.core.errors import UsageError

LOCK_FILE = ".lock"


class RunDirectoryBusy(UsageError):
    """Another process is writing to this run directory."""


class RunLock:
    """An exclusive advisory lock on a run directory (which must exist); release() or `with` ends it."""

    def __init__(self, directory: str | Path, wait: bool = False,
                 on_wait: Callable[[str], None] | None = None):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = describe_holder(self.path)
                if not wait:
                    raise RunDirectoryBusy(
                        f"run directory {self.directory} is in use by {holder}; two writers would corrupt it. "
                        f"Wait for that process to finish (or pass --wait), or use another --out"
                    ) from None
                if on_wait is not None:
                    on_wait(f"waiting for {holder} to finish with {self.directory}")
                fcntl.flock(fd, fcntl.LOCK_EX)
            _write_holder(fd)
        except BaseException:
            os.close(fd)  # closing the descriptor drops a lock taken on it
            raise
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (idempotent). The lock file stays: see the module docstring."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a forgotten lock must not outlive its object in a long-lived process
        self.release()


def _write_holder(fd: int) -> None:
    info = {
        "pid": os.getpid(),
        "host": platform.node(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


def read_holder(path: str | Path) -> dict[str, Any] | None:
    """What the lock file says about its holder (None when it says nothing readable)."""
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _may_be_alive(info: dict[str, Any]) -> bool:
    if info.get("host") != platform.node():
        return True  # another machine's process (a shared file system): nothing to ask
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def describe_holder(path: str | Path) -> str:
    """'process 123 on host (command) since ...', or 'another process' while the holder has not written yet."""
    info = read_holder(path)
    if not info or "pid" not in info or not _may_be_alive(info):
        return "another process"  # the holder has not written yet: the file still names an earlier one
    text = f"process {info['pid']}"
    if info.get("host"):
        text += f" on {info['host']}"
    if info.get("command"):
        text += f" ({info['command']})"
    if info.get("since"):
        text += f" since {info['since']}"
    return text
