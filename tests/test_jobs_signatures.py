"""The public entry points show every keyword they accept (signature, help()), generated from `JobOptions` and
the settings dataclasses, and still refuse unknown keywords."""

from __future__ import annotations

import dataclasses
import inspect
import pydoc

import pytest

import robusteval
from robusteval import jobs
from robusteval.attacks.evaluate import prepare_attack
from robusteval.attacks.settings import AttackSettings
from robusteval.generative.denoising import evaluate_denoising
from robusteval.generative.generation import counterfactual, sample
from robusteval.smoothing import SmoothingSettings, prepare_smoothing

JOB_OPTIONS = [f.name for f in dataclasses.fields(jobs.JobOptions)]
# What predict refuses although certify takes it (n0 is 0 for predict).
CERTIFY_ONLY = {"n0", "method", "radii", "n_max", "futility", "design"}


def _parameters(function):
    return inspect.signature(function).parameters


@pytest.mark.parametrize("function", [robusteval.evaluate_attack, prepare_attack, robusteval.certify,
                                      robusteval.predict, prepare_smoothing])
def test_every_job_option_is_in_the_signature_and_no_catch_all_is(function):
    parameters = _parameters(function)
    assert set(JOB_OPTIONS) <= set(parameters)
    assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for field in dataclasses.fields(jobs.JobOptions):
        if field.name != "dataset":  # the positional data set has the entry point's own default
            assert parameters[field.name].default == field.default
            assert parameters[field.name].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("function", [robusteval.evaluate_attack, prepare_attack])
def test_attack_entry_points_show_every_attack_setting_with_its_default(function):
    parameters = _parameters(function)
    for field in dataclasses.fields(AttackSettings):
        assert parameters[field.name].default == field.default, field.name
    if function is robusteval.evaluate_attack:
        assert {"out": None, "resume": True, "progress": False}.items() <= {
            name: p.default for name, p in parameters.items()}.items()


def test_certify_and_predict_show_the_smoothing_settings_and_their_own_keywords():
    settings = {f.name for f in dataclasses.fields(SmoothingSettings)} - {"kind"}
    certify, predict = _parameters(robusteval.certify), _parameters(robusteval.predict)
    own = {"n_images", "skip", "batch_size", "compile", "out", "resume", "progress", "n_max"}
    assert settings | own <= set(certify)
    assert (settings - CERTIFY_ONLY) | (own - CERTIFY_ONLY) <= set(predict)
    assert not CERTIFY_ONLY & set(predict)
    assert certify["alpha"].default == 0.001 and certify["mode"].default == "direct" and certify["n0"].default == 100
    assert certify["sigma"].default is inspect.Parameter.empty  # required
    assert predict["n"].default == 1000 and certify["skip"].default == 0


@pytest.mark.parametrize("function", [evaluate_denoising, sample, counterfactual])
def test_commands_without_shards_show_the_other_options(function):
    assert set(JOB_OPTIONS) - {"shard"} <= set(_parameters(function))
    assert "shard" not in _parameters(function)


def test_help_lists_the_options():
    text = pydoc.render_doc(robusteval.evaluate_attack, renderer=pydoc.plaintext)
    for name in ("allow_unsafe_pickle=False", "model_dir=None", "decision_draws=100", "batch_size=500"):
        assert name in text
    assert "allow_unsafe_pickle=False" in inspect.getdoc(robusteval.certify)


def test_a_new_job_option_appears_by_itself(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class MoreOptions(jobs.JobOptions):
        new_option: int = 7

    monkeypatch.setattr(jobs, "JobOptions", MoreOptions)

    @jobs.shows_keywords(AttackSettings)
    def entry(model, dataset="digits", **keywords):
        """An entry point."""

    assert _parameters(entry)["new_option"].default == 7
    assert "new_option=7" in entry.__doc__


def test_unknown_keywords_are_still_refused_with_the_same_message():
    with pytest.raises(TypeError, match="unexpected keyword\\(s\\) attak; the options every evaluation takes"):
        robusteval.evaluate_attack("standard", attak="pgd")
    with pytest.raises(TypeError, match="unexpected keyword\\(s\\) sigmaa"):
        robusteval.certify("standard", sigma=0.25, sigmaa=0.5)
    with pytest.raises(TypeError):
        inspect.signature(robusteval.evaluate_attack).bind("standard", attak="pgd")
