"""How a record dataclass becomes JSON: its fields in declaration order, nested records and lists too.

Shared by the run records (`robusteval.records`) and the run configurations (`robusteval.records.configs`).
"""

from __future__ import annotations

import dataclasses
from typing import Any


def to_json_dict(record: Any) -> dict[str, Any]:
    """The fields of a record dataclass as a JSON-ready dict, in declaration order (nested records too)."""
    return {f.name: plain(getattr(record, f.name)) for f in dataclasses.fields(record)}


def plain(value: Any) -> Any:
    """A field's value as JSON: nested records by their own to_json, containers element by element."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value
