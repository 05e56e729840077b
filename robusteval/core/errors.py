"""The project's one exception type for user errors.

A `UsageError` is a mistake in what the user asked for: an unknown name, a
bad option value, a missing or malformed file, a model without the asked-for
capability. The command line prints it as one line and exits with code 2;
any other exception is a bug and keeps its traceback (exit 1).

It subclasses ValueError, so `except ValueError` keeps catching bad input.
The subclasses below also keep the built-in type a caller may catch.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A user error: bad names, bad files, bad options. The CLI prints it in one line (exit 2)."""


class MissingFileError(UsageError, FileNotFoundError):
    """A file or directory the user named (or a command needs) does not exist."""


class NotADirectoryUsageError(UsageError, NotADirectoryError):
    """A path the user gave as a directory is something else."""
