"""Any denoiser before any classifier (`--denoiser`, issue 27): the same records as a model's own denoiser when
named explicitly, both models in the configuration, and mismatches refused before a run directory exists."""

import json

import pytest
import torch
from click.testing import CliRunner

import robusteval
from robusteval.cli import main
from robusteval.core.checkpoints import save_safetensors
from robusteval.core.errors import UsageError
from robusteval.core.interface import trusted_inputs
from robusteval.model_zoo.paired import PairedDenoiser

CERTIFY = dict(sigma=0.25, n0=10, n=100, n_images=3, device="cpu", compile=False, mode="denoised")
# The masking checks (AutoAttack's, through cdn's double backprop) would cost 10 s here and decide nothing compared.
ATTACK = dict(attack="fgsm", eps=[0.1], n=4, defense="denoise:0.25", gradient="full", large_eps_check=False,
              masking_checks=False, device="cpu")


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "batch_seconds")} for r in records]


def test_a_models_own_denoiser_named_explicitly_gives_todays_records(tmp_path) -> None:
    own = robusteval.certify("cdn", "digits", **CERTIFY)
    named = robusteval.certify("cdn", "digits", denoiser="cdn", out=tmp_path / "c", **CERTIFY)
    assert _without_timing(named.records) == _without_timing(own.records)
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["model"] == "cdn" and config["denoiser"] == "cdn" and len(config["denoiser_fingerprint"]) == 16
    assert "denoiser" not in own.config

    attacked = robusteval.evaluate_attack("cdn", "digits", **ATTACK)
    named = robusteval.evaluate_attack("cdn", "digits", denoiser="cdn", out=tmp_path / "a", **ATTACK)
    assert _without_timing(named.records) == _without_timing(attacked.records)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["denoiser"] == "cdn" and config["denoiser_fingerprint"] == json.loads(
        (tmp_path / "c" / "config.json").read_text())["denoiser_fingerprint"]


def test_another_models_denoiser_is_the_one_that_purifies(tmp_path) -> None:
    """standard has no denoiser; with cdn's it certifies in denoised mode, and the base classifier it smooths
    is exactly standard's logits of cdn's denoised image."""
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(main, ["certify", "--model", "standard", "--denoiser", "cdn", "--mode", "denoised",
                                  "--sigma", "0.25", "--n0", "10", "--n", "100", "--n-images", "3", "--device", "cpu",
                                  "--no-compile", "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["model"], config["denoiser"], config["mode"]) == ("standard", "cdn", "denoised")

    standard, cdn = robusteval.create_model("standard"), robusteval.create_model("cdn")
    paired = PairedDenoiser(standard, cdn)
    x = robusteval.load_dataset("digits").x[:5] + 0.25 * torch.randn(5, 1, 8, 8, generator=torch.Generator()
                                                                      .manual_seed(0))
    with trusted_inputs():  # the denoised images leave [0, 1] a little, as in the engine
        torch.testing.assert_close(paired.logits(paired.denoise(x, 0.25)), standard.logits(cdn.denoise(x, 0.25)))
    assert paired.capabilities == standard.capabilities | {"denoise"}


def test_a_denoiser_of_another_data_set_is_one_line_before_any_run_directory(tmp_path) -> None:
    mnist_cdn = robusteval.create_model("cdn", dataset="mnist", pretrained=False)
    weights = tmp_path / "cdn-mnist.safetensors"
    save_safetensors(mnist_cdn, weights, metadata={"model": "cdn", "dataset": "mnist"})
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", "--model", "standard", "--denoiser", "cdn", "--denoiser-checkpoint",
                                       str(weights), "--defense", "denoise:0.25", "--attack", "fgsm", "--n", "4",
                                       "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 2, result.output
    message = [line for line in result.output.splitlines() if line.strip()]
    assert len(message) == 1 and "mnist" in message[0] and "digits" in message[0] and "--denoiser" in message[0]
    assert not out.exists()


class _SmallDenoiser(robusteval.JointModel):
    capabilities = frozenset({"denoise"})
    name = "small"
    num_classes = 10
    input_shape = (1, 4, 4)

    def _denoise(self, x, sigma):
        return x


def test_a_shape_mismatch_is_refused_before_a_run_directory_exists(tmp_path) -> None:
    out = tmp_path / "run"
    with pytest.raises(UsageError, match=r"shape \(1, 4, 4\).*\(1, 8, 8\)"):
        robusteval.evaluate_attack("standard", "digits", denoiser=_SmallDenoiser(), out=out, **ATTACK)
    with pytest.raises(UsageError, match=r"shape"):
        robusteval.certify("standard", "digits", denoiser=_SmallDenoiser(), out=out, **CERTIFY)
    assert not out.exists()


@pytest.mark.parametrize("args", [
    ["run", "--model", "standard", "--denoiser", "cdn", "--attack", "fgsm"],  # no denoise defense
    ["certify", "--model", "standard", "--denoiser", "cdn", "--sigma", "0.25"],  # direct mode
    ["run", "--model", "standard", "--denoiser", "gaussian", "--defense", "denoise:0.25"],  # no denoise capability
])
def test_a_denoiser_where_nothing_denoises_is_refused(tmp_path, args) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [*args, "--n" if args[0] == "run" else "--n-images", "2", "--device", "cpu",
                                       "--out", str(out)])
    assert result.exit_code == 2 and "denois" in result.output, result.output
    assert not out.exists()
