"""Looking up user-typed names (models, attacks, data sets) with suggestions."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from robusteval.core.errors import UsageError


class UnknownNameError(KeyError, UsageError):
    """An unknown model, attack or data set name; the message suggests close matches."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def suggest(name: str, known: Iterable[str], kind: str) -> str:
    """A message saying `name` is unknown, with the closest known names."""
    known = sorted(known)
    close = difflib.get_close_matches(name.lower(), [k.lower() for k in known], n=3, cutoff=0.5)
    by_lower = {k.lower(): k for k in known}
    hint = f" Did you mean: {', '.join(by_lower[c] for c in close)}?" if close else ""
    return f"unknown {kind} '{name}'.{hint} Known {kind}s: {', '.join(known)}"


def resolve_name(name: str, known: Iterable[str], kind: str) -> str:
    """Return the known name matching `name` (case-insensitively) or raise UnknownNameError."""
    known = list(known)
    for candidate in known:
        if candidate.lower() == name.lower():
            return candidate
    raise UnknownNameError(suggest(name, known, kind))
