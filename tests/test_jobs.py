"""One shape for every evaluation: the same options, resolver, errors and prepared job from the CLI and the API."""

from __future__ import annotations

import dataclasses
import json
from types import MappingProxyType

import pytest
import torch
from click.testing import CliRunner

import robusteval
from robusteval import cli
from robusteval.attacks.evaluate import prepare_attack
from robusteval.benchmark import SUITES, run_benchmark
from robusteval.core.errors import UsageError
from robusteval.generative.denoising import evaluate_denoising, prepare_denoising
from robusteval.generative.generation import counterfactual, sample
from robusteval.jobs import JobOptions
from robusteval.runs import PROVENANCE_KEY, config_id
from robusteval.smoothing.engine import SmoothingSettings, prepare_smoothing

OPTION_NAMES = [f.name for f in dataclasses.fields(JobOptions)]
EVALUATION_COMMANDS = ("run", "certify", "predict", "denoise", "sample", "counterfactual", "benchmark")
SETTINGS = SmoothingSettings("certify", sigma=0.25, n=20, alpha=0.01, n0=5)


def test_every_evaluation_command_has_the_same_job_flags_with_the_same_help() -> None:
    expected = None
    for name in EVALUATION_COMMANDS:
        params = {p.name: p for p in cli.main.commands[name].params}
        assert set(OPTION_NAMES) <= set(params), name
        described = {key: (params[key].opts, params[key].help, params[key].default) for key in OPTION_NAMES}
        expected = expected or described
        assert described == expected, name
    assert expected["checkpoint"][0] == ["--checkpoint"] and ".pt" in expected["checkpoint"][1]


@pytest.mark.parametrize("entry", [robusteval.evaluate_attack, robusteval.certify, robusteval.predict,
                                   evaluate_denoising, sample, counterfactual])
def test_every_api_entry_point_refuses_an_unknown_option_and_names_the_shared_ones(entry) -> None:
    shared = ("data_dir, checkpoint, model_dir, allow_unsafe_pickle, vae, model_config, model_kwargs, preprocessing, "
              "every, device")
    with pytest.raises(TypeError, match=shared):
        entry("standard", "digits", not_an_option=1, **({"sigma": 0.25} if entry in (robusteval.certify,
                                                                                  robusteval.predict) else {}))


def test_benchmark_refuses_other_weights(tmp_path) -> None:
    with pytest.raises(UsageError, match="shipped weights"):
        run_benchmark(SUITES["digits-ci"], tmp_path, models=("standard",), checkpoint="w.safetensors")


def test_an_xy_pair_is_the_same_custom_data_set_for_attacks_and_smoothing() -> None:
    data = robusteval.load_dataset("digits")
    pair = (data.x[:6], data.y[:6])
    standard, gaussian = robusteval.create_model("standard"), robusteval.create_model("gaussian")
    attack = prepare_attack(standard, pair, attack="fgsm", eps=0.1, device="cpu")
    smoothing = prepare_smoothing(gaussian, pair, SETTINGS, device="cpu")
    assert attack.config["dataset"] == smoothing.config["dataset"] == "custom"
    for bad in ((data.x[:6], data.y[:5]), (data.x[:6].numpy(), data.y[:6]), "nope"):
        with pytest.raises(UsageError):
            prepare_attack(standard, bad, attack="fgsm", eps=0.1, device="cpu")
        with pytest.raises(UsageError):
            prepare_smoothing(gaussian, bad, SETTINGS, device="cpu")


def test_a_joint_model_instance_with_a_checkpoint_is_a_usage_error() -> None:
    model = robusteval.create_model("standard")
    with pytest.raises(UsageError, match="registered model name"):
        prepare_attack(model, "digits", attack="fgsm", eps=0.1, checkpoint="w.safetensors")


def test_data_that_does_not_fit_the_model_is_refused_the_same_way_by_every_engine() -> None:
    x = torch.rand(4, 1, 9, 9)
    y = torch.zeros(4, dtype=torch.long)
    messages = set()
    models = {name: robusteval.create_model(name) for name in ("standard", "gaussian", "dncnn+standard")}
    for name, prepare in (("standard", lambda: prepare_attack(models["standard"], (x, y), attack="fgsm", eps=0.1)),
                          ("gaussian", lambda: prepare_smoothing(models["gaussian"], (x, y), SETTINGS)),
                          ("dncnn+standard", lambda: prepare_denoising(models["dncnn+standard"], (x, y)))):
        with pytest.raises(UsageError) as caught:
            prepare()
        messages.add(str(caught.value).replace(f"'{name}'", "<model>"))  # the message without the model's name
    assert messages == {"model <model> takes images of shape 1×8×8 but data set 'custom' has images of shape 1×9×9; "
                        "use data of the model's size or a model built for this data"}


def test_a_prepared_job_has_a_frozen_config_its_hash_and_default_directory() -> None:
    job = prepare_denoising("dncnn+standard", "digits", sigmas=(0.25,), n_images=4)
    assert isinstance(job.config, MappingProxyType)
    with pytest.raises(TypeError):
        job.config["seed"] = 1  # type: ignore[index]
    assert job.config_hash == config_id(dict(job.config))
    assert job.default_run_dir("runs").name == f"denoise-dncnn+standard-digits-{job.config_hash}"


def test_the_cli_runs_the_job_the_api_prepares(tmp_path) -> None:
    out = tmp_path / "cert"
    result = CliRunner().invoke(cli.main, ["certify", "--model", "gaussian", "--sigma", "0.25", "--n", "20",
                                           "--n0", "5", "--alpha", "0.01", "--n-images", "3", "--device", "cpu",
                                           "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = json.loads((out / "config.json").read_text())
    written.pop(PROVENANCE_KEY)
    api = prepare_smoothing("gaussian", "digits", SETTINGS, n_images=3, device="cpu")
    assert written == dict(api.config)
    assert api.run().summary["certified_accuracy"] == json.loads((out / "summary.json").read_text())[
        "certified_accuracy"]


def test_a_new_job_option_becomes_a_flag_through_the_one_decorator(monkeypatch) -> None:
    import click

    from robusteval.cli import options as cli_options
    from robusteval.jobs import CliFlag, _option

    @dataclasses.dataclass(frozen=True)
    class Extended(JobOptions):
        shard: str | None = _option(None, CliFlag("--shard", "Evaluate one shard, I/N."))

    monkeypatch.setattr(cli_options, "JobOptions", Extended)

    @click.command()
    @cli_options.job_options
    def command(**params: object) -> None:
        click.echo(json.dumps(cli_options.split_job_options(params)[1], default=str, sort_keys=True))

    result = CliRunner().invoke(command, ["--shard", "1/4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["shard"] == "1/4"
    assert Extended.of("digits", {"shard": "1/4"}).shard == "1/4"
