"""Assertions shared by the command-line tests: a one-line error, and a run's summary without its timings."""

from __future__ import annotations

import json
from pathlib import Path


def one_line_error(result, *fragments: str) -> str:
    """The command failed with exit 2 and an `error:` last line on stderr holding every fragment, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in message, message
    return message


def summary_without_time(path: Path) -> dict:
    """A run directory's summary.json without its wall time, for comparing runs."""
    summary = json.loads((path / "summary.json").read_text())
    summary.pop("seconds")
    return summary
