"""Checks of records read back from JSON (summary.json): each failure is a `RecordFormatError` naming the key."""

from __future__ import annotations

from typing import Any

from robusteval.core.errors import UsageError


class RecordFormatError(UsageError):
    """A record (usually a summary.json) that breaks its kind's contract."""


def fail(message: str) -> RecordFormatError:
    return RecordFormatError(message)


def check_fraction(where: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
        raise fail(f"{where} must be a fraction in [0, 1], got {value!r}")


def check_count(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise fail(f"{key} must be a positive integer, got {value!r}")


def check_points(data: dict[str, Any], list_key: str, point_keys: tuple[str, ...]) -> list[dict[str, Any]]:
    points = data[list_key]
    if not isinstance(points, list) or not points:
        raise fail(f"{list_key} must be a non-empty list")
    for i, point in enumerate(points):
        if not isinstance(point, dict) or any(k not in point for k in point_keys):
            raise fail(f"{list_key}[{i}] must be an object with {', '.join(point_keys)}")
        if any(not isinstance(point[k], (int, float)) or isinstance(point[k], bool) for k in point_keys):
            raise fail(f"{list_key}[{i}] has a non-numeric value: {point}")
    return points


def require(data: dict[str, Any], kind: str, keys: tuple[str, ...]) -> None:
    missing = [key for key in keys if key not in data]
    if missing:
        raise fail(f"summary.json of a {kind} run lacks {', '.join(missing)}")
