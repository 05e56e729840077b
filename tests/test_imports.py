"""Every module of the package imports by its dotted name: nothing shadows a subpackage or module."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import robusteval

MODULES = sorted(info.name for info in pkgutil.walk_packages(robusteval.__path__, "robusteval.")
                 if not info.name.endswith("__main__"))  # __main__ runs the command line


def test_the_walk_finds_the_subpackages_and_their_modules() -> None:
    assert {"robusteval.smoothing.engine", "robusteval.attacks.batch", "robusteval.cli.evaluate",
            "robusteval.reports.loading", "robusteval.model_zoo.registry"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_import_as_binds_the_module(name: str) -> None:
    namespace: dict = {}
    exec(f"import {name} as m", namespace)  # the statement that fails when an attribute shadows a subpackage
    assert namespace["m"] is importlib.import_module(name)
    assert namespace["m"].__name__ == name


def test_the_functions_named_like_engines_stay_functions() -> None:
    assert callable(robusteval.certify) and callable(robusteval.predict)
    import robusteval.smoothing.decisions as decisions

    assert decisions.certify_decision(__import__("numpy").array([0, 10]), __import__("numpy").array([0, 100]),
                                      0.25, 0.001).prediction == 1
