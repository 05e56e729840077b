"""Files written atomically: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from robusteval.core.errors import UsageError


class DiskFullError(UsageError, OSError):
    """The device filled up while a file was written (ENOSPC); the message says where and how much was written."""


def write_all(fd: int, data: bytes) -> int:
    """os.write until all of `data` is written (a write may be short); returns the bytes written.

    An OSError leaves `.written` on the error: how many bytes went out before it.
    """
    view, written = memoryview(data), 0
    while written < len(data):
        try:
            written += os.write(fd, view[written:])
        except OSError as error:
            error.written = written  # type: ignore[attr-defined]
            raise
    return written


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def _current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the permissions open() would, so shared runs stay readable.
        os.chmod(tmp, 0o666 & ~_UMASK)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(error):
            written = getattr(error, "written", len(data))
            raise DiskFullError(f"no space left on device writing {path}: {written:,} of {len(data):,} bytes were "
                                f"written; {path.name} is unchanged (the partial copy was removed). Free space and run "
                                f"the command again") from None
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
