"""Helpers for the report tests: the committed fixture runs and modified copies of them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

FIXTURE_RUNS = Path(__file__).parent / "fixtures" / "runs"


def fixture_summary(name: str) -> dict[str, Any]:
    return json.loads((FIXTURE_RUNS / name / "summary.json").read_text())


def copy_run(name: str, destination: Path, edit: Callable[[dict[str, Any]], None] | None = None,
             new_name: str | None = None) -> Path:
    """Copy a fixture run to `destination`/`new_name`, optionally editing its summary in place."""
    target = destination / (new_name or name)
    shutil.copytree(FIXTURE_RUNS / name, target)
    if edit is not None:
        path = target / "summary.json"
        summary = json.loads(path.read_text())
        edit(summary)
        path.write_text(json.dumps(summary))
    return target


def copy_all(destination: Path) -> list[Path]:
    return [copy_run(p.name, destination) for p in sorted(FIXTURE_RUNS.iterdir()) if p.is_dir()]


def _make_runs():
    """tests/fixtures/make_runs.py as a module (its writers take an absolute path as the run name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_runs", Path(__file__).parent / "fixtures" / "make_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ZOO_JOINT = ("cdn", "egc", "jem", "gmmc", "dmae", "jdm")
ZOO_BASELINES = ("standard", "gaussian", "gaussian-s0.12", "gaussian-s0.5", "pgd-at", "dncnn+standard")
ZOO_DENOISERS = ("cdn", "egc", "dmae", "jdm", "dncnn+standard")


def write_zoo_runs(destination: Path) -> Path:
    """Run directories shaped like the full digits zoo's: 12 models, each attacked without defense (L∞, L2) and
    through at least 2 pipelines (noise, and denoise, sgld or smooth), certified per σ (direct, and denoised for
    the models with a denoiser), and the denoisers' PSNR. Deterministic."""
    make = _make_runs()
    destination.mkdir(parents=True, exist_ok=True)
    seed = 100

    def name(text: str) -> str:
        return str(destination / text)  # absolute: make_runs' ROOT / name is then this path

    for k, model in enumerate(ZOO_JOINT + ZOO_BASELINES):
        seed += 10
        strength = 0.05 + 0.01 * ((k * 7) % 12)
        flags = ["zero-gradients: 35 of 40 points have a zero input gradient"] if model in ("cdn", "gmmc") else None
        make.attack_run(name(f"{model}-autoattack-Linf"), model=model, attack="autoattack", norm="Linf",
                        defense="none", clean_correct=34 + k % 6, scale=strength, seed=seed, flags=flags)
        make.attack_run(name(f"{model}-autoattack-L2"), model=model, attack="autoattack", norm="L2", defense="none",
                        clean_correct=34 + k % 6, scale=8 * strength, seed=seed + 1)
        make.attack_run(name(f"{model}-noise-Linf"), model=model, attack="autoattack-rand", norm="Linf",
                        defense="noise:0.25", clean_correct=33 + k % 5, scale=1.3 * strength, seed=seed + 2, eot=20,
                        gradient="full")
        if model in ZOO_DENOISERS:
            make.attack_run(name(f"{model}-denoise-Linf"), model=model, attack="autoattack", norm="Linf",
                            defense="denoise:0.25", clean_correct=32 + k % 7, scale=1.6 * strength, seed=seed + 3,
                            gradient="bpda")
        elif model in ("jem", "gmmc"):
            make.attack_run(name(f"{model}-sgld-Linf"), model=model, attack="autoattack-rand", norm="Linf",
                            defense="sgld:20" if model == "jem" else "sgld:20:0.01:0.005:5",  # gmmc's own chain step
                            clean_correct=31 + k % 4, scale=1.4 * strength, seed=seed + 3, eot=20)
        else:
            make.attack_run(name(f"{model}-smooth-Linf"), model=model, attack="autoattack-rand", norm="Linf",
                            defense="smooth:0.25:16", clean_correct=31 + k % 4, scale=1.5 * strength, seed=seed + 3,
                            eot=20)
        own = {"gaussian": (0.25,), "gaussian-s0.12": (0.12,), "gaussian-s0.5": (0.5,)}
        for j, sigma in enumerate(own.get(model, (0.12, 0.25, 0.5))):
            base = 2.0 + (k * 5) % 9
            make.certify_run(name(f"{model}-certify-direct-{sigma}"), model=model, mode="direct", sigma=sigma,
                             seed=seed + 4 + j, strength=base / (1 + j))
            if model in ZOO_DENOISERS:
                make.certify_run(name(f"{model}-certify-denoised-{sigma}"), model=model, mode="denoised",
                                 sigma=sigma, seed=seed + 7 + j, strength=0.8 * base / (1 + j))
        if model in ZOO_DENOISERS:
            make.denoise_run(name(f"{model}-denoise"), model=model, seed=seed + 9, gain=3.0 + k % 5)
    return destination
