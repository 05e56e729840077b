"""Make the PyPI AutoAttack distribution importable as `autoattack`.

robustbench 1.1.1 does `from autoattack import AutoAttack` and
`from autoattack.state import EvaluationState`, but the `pyautoattack`
distribution installs as the module `pyautoattack`. This is the one place
that aliases it; `robusteval/__init__.py` runs it before anything imports
robustbench.
"""

from __future__ import annotations

import importlib
import sys


def install() -> None:
    """Register `pyautoattack` (and its submodules) under the name `autoattack`."""
    if "autoattack" in sys.modules:
        return
    package = importlib.import_module("pyautoattack")
    sys.modules["autoattack"] = package
    for sub in ("autoattack", "autopgd_base", "checks", "fab_base", "fab_projections", "fab_pt", "other_utils", "square", "state"):
        sys.modules[f"autoattack.{sub}"] = importlib.import_module(f"pyautoattack.{sub}")
