"""The attack's progress bar moves within a batch (per ε and per component) and a resumed run starts where it
left off. Positions are read from the bar after each update: no timing."""

from __future__ import annotations

from typing import ClassVar

import pytest

import robusteval
from robusteval.attacks import batch, engine
from robusteval.attacks.catalog import BuiltAttack
from robusteval.attacks.progress import AttackProgress

EPS = [0.05, 0.1, 0.15]


class _Recording(AttackProgress):
    """The engine's bar, remembering where it stood after every update."""

    bars: ClassVar[list[_Recording]] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.positions = [self.position]
        _Recording.bars.append(self)

    def advance(self, points, share):
        super().advance(points, share)
        self.positions.append(self.position)

    def finished(self, points, robust=None):
        super().finished(points, robust)
        self.positions.append(self.position)


class _Killed(Exception):
    pass


@pytest.fixture()
def bars(monkeypatch):
    _Recording.bars = []
    monkeypatch.setattr(engine, "AttackProgress", _Recording)
    return _Recording.bars


@pytest.fixture(scope="module")
def standard():
    return robusteval.create_model("standard", device="cpu")


def _run(model, out=None, **keywords):
    options = {"attack": "pgd", "eps": EPS, "n": 30, "batch_size": 30, "device": "cpu", "seed": 4,
               "large_eps_check": False}
    return robusteval.evaluate_attack(model, "digits", out=out, progress=True, **(options | keywords))


def test_one_batch_moves_per_eps_and_per_component(bars, standard, monkeypatch):
    real_build = batch.build_attack

    def twice(*args, **kwargs):  # two components per ε: the bar moves after each
        built = real_build(*args, **kwargs)
        return BuiltAttack(built.components * 2, built.skipped)

    monkeypatch.setattr(batch, "build_attack", twice)
    _run(standard)
    (bar,) = bars
    assert bar.positions == sorted(bar.positions) and bar.positions[0] == 0 and bar.positions[-1] == 30
    # A sixth of the batch after the first component at the first ε (the first component always runs), a third
    # after each ε: the bar is not at 0 until the batch ends.
    assert 5 in bar.positions
    assert {10, 20} <= set(bar.positions[:-1])


def test_a_resumed_run_starts_at_its_finished_batches_and_eps(bars, standard, monkeypatch, tmp_path):
    real_build = batch.build_attack
    built = []

    def build(spec, attacked, expected, *, eps, **options):
        built.append(eps)
        if built.count(0.15) == 2 and kill:  # the second batch's last ε
            raise _Killed
        return real_build(spec, attacked, expected, eps=eps, **options)

    monkeypatch.setattr(batch, "build_attack", build)
    kill = True
    with pytest.raises(_Killed):
        _run(standard, tmp_path / "run", batch_size=15)
    assert bars[0].positions[-1] == 15 + 10  # batch 0 done, two of three ε of batch 1
    kill = False
    _run(standard, tmp_path / "run", batch_size=15)
    resumed = bars[1]
    # Batch 0's 15 points, then two thirds of batch 1 before any work of this call.
    assert resumed.positions[:2] == [15, 25]
    assert resumed.positions[-1] == 30 and resumed.positions == sorted(resumed.positions)


def test_advance_never_moves_back_and_finished_lands_on_the_batch_end():
    bar = AttackProgress(100, enabled=False, initial=40)
    bar.advance(30, 0.5)
    assert bar.position == 55
    bar.advance(30, 0.2)
    assert bar.position == 55
    bar.finished(30)
    assert bar.position == 70 and bar.seen == 70
