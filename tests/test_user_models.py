"""`--model package.module:factory`: a user's model from the command line, recorded with its file's hash."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from robusteval.attacks.evaluate import prepare_attack
from robusteval.core.errors import UsageError
from robusteval.generative.denoising import prepare_denoising
from robusteval.smoothing.engine import prepare_smoothing
from robusteval.smoothing.settings import SmoothingSettings

MODULE = textwrap.dedent('''
    """A user's models, outside robusteval."""
    import torch
    from torch import nn

    from robusteval.core.interface import wrap


    def linear(scale=1.0):
        torch.manual_seed(0)
        layer = nn.Linear(64, 10)
        layer.weight.data *= scale
        return nn.Sequential(nn.Flatten(), layer).train()  # robusteval must evaluate it in eval mode


    def joint():
        return wrap(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), 10, (1, 8, 8), name="mine")


    def not_a_model():
        return 42


    def raises():
        raise RuntimeError("no weights here")


    def wrong_width():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 7))
''')


@pytest.fixture()
def user_module(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "userpkg"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "models.py").write_text(MODULE)
    (tmp_path / "broken_models.py").write_text("import a_module_that_does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return folder / "models.py"


def _cli(args: list[str], root: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "robusteval", *args], env=env, capture_output=True, text=True,
                          check=False, timeout=300)


@pytest.mark.slow  # a subprocess: ~20 s on 2 shared cores
def test_run_with_a_factory_from_the_command_line_records_its_file_and_keywords(user_module, tmp_path):
    out = tmp_path / "run"
    result = _cli(["run", "--model", "userpkg.models:linear", "--model-kwargs", '{"scale": 2.0}',
                   "--attack", "fgsm", "--eps", "0.1", "--n", "20", "--device", "cpu", "--quiet", "--out", str(out)],
                  tmp_path)
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "userpkg.models:linear"
    source = config["model_source"]
    assert source["factory"] == "userpkg.models:linear"
    assert Path(source["file"]) == user_module.resolve()
    assert source["sha256"] == hashlib.sha256(user_module.read_bytes()).hexdigest()
    assert source["kwargs"] == {"scale": 2.0}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 20


def test_the_factory_model_is_wrapped_for_the_data_set_in_eval_mode(user_module):
    job = prepare_attack("userpkg.models:linear", "digits", attack="fgsm", eps=[0.1], n=10, device="cpu",
                         model_kwargs={"scale": 3.0})
    assert (job.model.num_classes, job.model.input_shape) == (10, (1, 8, 8))
    assert not job.model.training and not any(m.training for m in job.model.modules())
    torch.manual_seed(0)
    expected = torch.nn.Linear(64, 10).weight * 3.0
    assert torch.equal(job.model.module[1].weight, expected)  # the keywords reached the factory
    assert job.config["model_source"]["kwargs"] == {"scale": 3.0}


def test_a_joint_model_from_a_factory_keeps_its_name_and_every_job_records_the_source(user_module):
    settings = SmoothingSettings("certify", sigma=0.25, n=10, alpha=0.001, n0=5)
    certify = prepare_smoothing("userpkg.models:joint", "digits", settings, n_images=2, device="cpu")
    assert certify.config["model"] == "mine"
    assert certify.config["model_source"]["factory"] == "userpkg.models:joint"
    with pytest.raises(UsageError, match="denoise"):  # a wrapped classifier has no denoiser: refused, not made up
        prepare_denoising("userpkg.models:joint", "digits", device="cpu")


def test_registered_models_keep_their_configuration():
    job = prepare_attack("standard", "digits", attack="fgsm", eps=[0.1], n=5, device="cpu")
    assert "model_source" not in job.config
    with pytest.raises(UsageError, match="--model-kwargs applies to a --model package.module:factory only"):
        prepare_attack("standard", "digits", attack="fgsm", eps=[0.1], n=5, model_kwargs="{}")


@pytest.mark.parametrize("reference, kwargs, message", [
    ("broken_models:make", None, "cannot import module 'broken_models' (ModuleNotFoundError"),
    ("userpkg.nothing:make", None, "cannot import module 'userpkg.nothing'"),
    ("userpkg.models:missing", None, "has no attribute 'missing'"),
    ("userpkg.models:MODULE_CONSTANT", None, "has no attribute"),
    ("userpkg.models:not_a_model", None, "returned a int; expected a torch.nn.Module"),
    ("userpkg.models:raises", None, "the factory raised RuntimeError: no weights here"),
    ("userpkg.models:wrong_width", None, "logits of shape (B, 10), got (1, 7)"),
    ("userpkg.models:linear", '{"width": 3}', "the factory raised TypeError"),
    ("userpkg.models:linear", "[1, 2]", "--model-kwargs: expected a JSON object"),
    ("userpkg.models:linear", "{oops", "--model-kwargs: expected a JSON object"),
])
def test_a_broken_factory_is_a_usage_error(user_module, reference, kwargs, message):
    with pytest.raises(UsageError) as caught:
        prepare_attack(reference, "digits", attack="fgsm", eps=[0.1], n=5, device="cpu", model_kwargs=kwargs)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.slow  # subprocesses
@pytest.mark.parametrize("reference", ["broken_models:make", "userpkg.models:not_a_model"])
def test_a_broken_factory_on_the_command_line_exits_2_with_one_line(user_module, tmp_path, reference):
    result = _cli(["certify", "--model", reference, "--sigma", "0.25", "--n", "10", "--n0", "5", "--n-images", "1",
                   "--out", str(tmp_path / "c")], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and reference in lines[0], result.stderr
    assert not (tmp_path / "c").exists()
