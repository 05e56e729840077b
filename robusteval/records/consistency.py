"""Every per-image record checked against its own fields, its run's configuration and the data set's labels.

A record that contradicts itself (an abstention marked correct, a radius that does not follow from its
p̲A, an ε the run never attacked at, `broken` false beside the attack that broke it) would be counted as it
stands by the summary recomputed from the records: resume, merge, report and check therefore read records
through `check_records`, which refuses the first impossible one as a `RecordInconsistent` naming the file,
the line and the field (one line, exit 2 on the command line).

What is checked, by kind:
- certify: `correct` == (prediction == label and not abstained); `radius` == σ·Φ⁻¹(`pA_lower`) (relative
  tolerance 1e-9) where certified, 0 where abstained; 0 <= `count` <= n; p̲A in [0, 1] and above ½ where
  certified; sequential: `draws` <= n_max, `count` <= `draws`, the largest certified grid radius one of
  the grid's and not beyond the radius.
- predict: `correct` as for certify; 0 <= `runner_up_count` <= `count` and their sum <= n.
- attack: `correct` == (clean prediction == label); one result per configured ε, in order; each result's
  `broken` true exactly where an attack is named, that attack one the run can record (the caller's
  `attack_labels`), only on a clean-correct point, with a prediction other than the label; the attack's
  own break (`standard_broken`) and the worst-of-N break imply / include `broken`.
- every kind: an integer `label`, equal to the data set's label at `index` where the caller has the data.

Records written before a field existed (certify's `abstain`, attack results named `eps` with `by`) are read
in their old form.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

from robusteval.core.errors import UsageError

# |radius - σ·Φ⁻¹(p̲A)| allowed, relative (and absolute, for radii near 0).
RADIUS_TOLERANCE = 1e-9


# Φ⁻¹ from the standard library (Wichura's AS241, accurate to double precision): scipy.stats costs ~0.6 s to import.
_STANDARD_NORMAL = NormalDist()


class RecordInconsistent(UsageError):
    """A per-image record that contradicts itself, its run's configuration or the data set's labels."""


class _Problem(Exception):
    def __init__(self, field: str, text: str):
        super().__init__(text)
        self.field, self.text = field, text


def _int(record: Mapping[str, Any], key: str) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Problem(key, f"expected an integer, got {value!r}")
    return value


def _bool(record: Mapping[str, Any], key: str) -> bool:
    value = record.get(key)
    if not isinstance(value, bool):
        raise _Problem(key, f"expected true or false, got {value!r}")
    return value


def _number(record: Mapping[str, Any], key: str) -> float:
    value = record.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise _Problem(key, f"expected a finite number, got {value!r}")
    return float(value)


def _label(record: Mapping[str, Any], data_labels: Callable[[int], int | None] | None) -> int:
    label = _int(record, "label")
    if data_labels is not None:
        expected = data_labels(_int(record, "index"))
        if expected is not None and expected != label:
            raise _Problem("label", f"{label} differs from the data set's label {expected} of image "
                                    f"{record['index']}")
    return label


def _abstained(record: Mapping[str, Any]) -> bool:
    """Whether a certify/predict record abstains (older records: prediction -1 or null, no `abstain`)."""
    prediction = record.get("prediction")
    if "abstain" not in record:
        return prediction is None or prediction == -1
    abstain = _bool(record, "abstain")
    if abstain != (prediction is None):
        raise _Problem("abstain", f"{abstain} beside prediction {prediction!r} (an abstention has no prediction)")
    return abstain


def _check_correct(record: Mapping[str, Any], label: int, abstain: bool) -> None:
    expected = not abstain and record.get("prediction") == label
    if _bool(record, "correct") != expected:
        what = "abstained" if abstain else f"prediction {record.get('prediction')!r}, label {label}"
        raise _Problem("correct", f"{record['correct']} but the record is {what}")


def _check_count(record: Mapping[str, Any], key: str, limit: int) -> int:
    value = _int(record, key)
    if not 0 <= value <= limit:
        raise _Problem(key, f"{value} is not within 0..{limit}")
    return value


def _check_certify(record: Mapping[str, Any], config: Mapping[str, Any], label: int) -> None:
    abstain = _abstained(record)
    _check_correct(record, label, abstain)
    sigma = float(config["sigma"])
    sequential = config.get("method") == "sequential"
    budget = int(config.get("n_max") or config["n"])
    if sequential:
        draws = _check_count(record, "draws", budget)
        _check_count(record, "count", draws)
    else:
        _check_count(record, "count", budget)
    p_lower = _number(record, "pA_lower")
    if not 0.0 <= p_lower <= 1.0:
        raise _Problem("pA_lower", f"{p_lower} is not a probability")
    radius = _number(record, "radius")
    if abstain:
        if radius != 0.0:
            raise _Problem("radius", f"{radius} on an abstained record (an abstention certifies radius 0)")
    else:
        if p_lower <= 0.5:
            raise _Problem("pA_lower", f"{p_lower} <= 0.5 on a certified record (it must abstain)")
        expected = sigma * _STANDARD_NORMAL.inv_cdf(p_lower) if p_lower < 1.0 else math.inf
        if not math.isclose(radius, expected, rel_tol=RADIUS_TOLERANCE, abs_tol=RADIUS_TOLERANCE):
            raise _Problem("radius", f"{radius} differs from sigma * Phi^-1(pA_lower) = {sigma:g} * "
                                     f"Phi^-1({p_lower}) = {expected}")
    if sequential and "largest_certified_radius" in record:
        largest = record["largest_certified_radius"]
        grid = [0.0, *(float(r) for r in config.get("radii") or [])]
        if largest is not None and (abstain or not any(math.isclose(float(largest), r) for r in grid)
                                    or float(largest) > radius * (1 + RADIUS_TOLERANCE) + RADIUS_TOLERANCE):
            raise _Problem("largest_certified_radius", f"{largest} is not a grid radius certified by radius "
                                                       f"{radius}{' (abstained)' if abstain else ''}")


def _check_predict(record: Mapping[str, Any], config: Mapping[str, Any], label: int) -> None:
    abstain = _abstained(record)
    _check_correct(record, label, abstain)
    n = int(config["n"])
    count = _check_count(record, "count", n)
    runner_up = _check_count(record, "runner_up_count", count)
    if count + runner_up > n:
        raise _Problem("runner_up_count", f"{runner_up} + count {count} exceed the n = {n} draws")
    p_value = _number(record, "p_value")
    if not 0.0 <= p_value <= 1.0:
        raise _Problem("p_value", f"{p_value} is not a probability")


def _check_attack(record: Mapping[str, Any], config: Mapping[str, Any], label: int,
                  attack_labels: Collection[str] | None) -> None:
    clean = _int(record, "clean_prediction")
    correct = clean == label
    if "correct" in record and _bool(record, "correct") != correct:
        raise _Problem("correct", f"{record['correct']} but clean_prediction {clean} and label {label}")
    key = "results" if "results" in record else "eps"
    results = record.get(key)
    eps = [float(e) for e in config.get("eps") or []]
    if not isinstance(results, list) or len(results) != len(eps):
        raise _Problem(key, f"expected one result per configured eps ({', '.join(f'{e:g}' for e in eps)})")
    for e, (result, expected_eps) in enumerate(zip(results, eps)):
        where = f"{key}[{e}]"
        if not isinstance(result, dict):
            raise _Problem(where, "expected an object")
        value = result.get("eps")
        if not isinstance(value, (int, float)) or not math.isclose(float(value), expected_eps, rel_tol=1e-9,
                                                                   abs_tol=1e-12):
            raise _Problem(f"{where}.eps", f"{value!r} is not the configured eps {expected_eps:g} (the run's eps: "
                                           f"{', '.join(f'{x:g}' for x in eps)})")
        _check_outcome(result, where, label, correct, attack_labels)


def _check_outcome(result: Mapping[str, Any], where: str, label: int, correct: bool,
                   attack_labels: Collection[str] | None) -> None:
    broken = _bool(result, "broken")
    name_key = "attack" if "attack" in result else "by"
    attack = result.get(name_key)
    if broken != (attack is not None):
        raise _Problem(f"{where}.broken", f"{broken} beside {name_key} {attack!r} (a point is broken exactly when "
                                          f"an attack is named)")
    if broken and not correct:
        raise _Problem(f"{where}.broken", "true on a point the model misclassifies without attack (only correct "
                                          "points are attacked)")
    if attack is not None and attack_labels is not None and attack not in attack_labels:
        raise _Problem(f"{where}.{name_key}", f"{attack!r} is not an attack of this run (expected one of "
                                              f"{', '.join(sorted(attack_labels))})")
    if broken and result.get("prediction") == label:
        raise _Problem(f"{where}.prediction", f"the label {label} on a broken point")
    if result.get("standard_broken") is True and not broken:
        raise _Problem(f"{where}.standard_broken", "true on a point that is not broken")
    if result.get("worst_broken") is False and broken:
        raise _Problem(f"{where}.worst_broken", "false on a broken point (worst-of-N includes every break)")


def record_problem(kind: str, config: Mapping[str, Any], record: Any, *,
                   attack_labels: Collection[str] | None = None,
                   data_labels: Callable[[int], int | None] | None = None) -> tuple[str, str] | None:
    """(field, what is wrong) for the first inconsistency of one record of a `kind` run, or None.

    `attack_labels`: the attack names an attack run can record (None: not checked). `data_labels(index)`: the
    data set's label of an image (None: not checked, e.g. where the data is not at hand).
    """
    try:
        if not isinstance(record, dict):
            raise _Problem("record", f"expected a JSON object, got {type(record).__name__}")
        label = _label(record, data_labels)
        if kind == "certify":
            _check_certify(record, config, label)
        elif kind == "predict":
            _check_predict(record, config, label)
        elif kind == "attack":
            _check_attack(record, config, label, attack_labels)
    except _Problem as problem:
        return problem.field, problem.text
    return None


def check_records(path: str | Path, kind: str, config: Mapping[str, Any], records: Sequence[Any], *,
                  attack_labels: Collection[str] | None = None,
                  data_labels: Callable[[int], int | None] | None = None, remedy: str = "") -> None:
    """Refuse the first inconsistent record of `records` (the lines of samples.jsonl at `path`, in order)."""
    for number, record in enumerate(records, start=1):
        found = record_problem(kind, config, record, attack_labels=attack_labels, data_labels=data_labels)
        if found is not None:
            field, text = found
            raise RecordInconsistent(f"{path} line {number}: field {field}: {text}; the record contradicts "
                                     f"itself or its run{'; ' + remedy if remedy else ''}")


def labels_lookup(labels: Sequence[int], first_index: int = 0) -> Callable[[int], int | None]:
    """`data_labels` for images first_index, first_index + 1, ... whose labels are `labels`."""
    def label_of(index: int) -> int | None:
        position = index - first_index
        return int(labels[position]) if 0 <= position < len(labels) else None
    return label_of
