"""`robusteval train` is deterministic and its record reproduces it; `robusteval list` and CLI errors."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import robusteval
from robusteval.cli import main
from robusteval.core.checkpoints import sha256_of

ARGS = ["train", "--model", "standard", "--epochs", "2", "--quiet"]


def train(out: Path, *extra: str) -> Path:
    result = CliRunner().invoke(main, [*ARGS, *extra, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    return out


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tmp_path_factory.mktemp("train") / "a.safetensors", "--seed", "3")


def test_training_twice_gives_identical_bytes(first_run: Path, tmp_path: Path) -> None:
    second = train(tmp_path / "b.safetensors", "--seed", "3")
    assert first_run.read_bytes() == second.read_bytes()


def test_the_record_matches_the_weights(first_run: Path) -> None:
    record = json.loads(first_run.with_suffix(".json").read_text())
    assert record["sha256"] == sha256_of(first_run)
    assert (record["model"], record["dataset"], record["file"]) == ("standard", "digits", first_run.name)
    assert (record["epochs"], record["seed"], record["train_threads"]) == (2, 3, 1)
    assert 0.0 <= record["metrics"]["test_accuracy"] <= 1.0
    # What decides the bytes of CPU training is named: PyTorch's vector kernels and the CPU.
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and record["cpu"]
    assert record["train_device"] == "cpu" and "--device" not in record["command"]
    # The weights are the model's: they load into the registered architecture through checkpoint=.
    model = robusteval.create_model("standard", checkpoint=first_run)
    test = robusteval.load_dataset("digits", split="test")
    with torch.no_grad():
        accuracy = float((model(test.x).argmax(1) == test.y).float().mean())
    assert accuracy == pytest.approx(record["metrics"]["test_accuracy"], abs=1e-4)


def test_another_seed_gives_other_weights(first_run: Path, tmp_path: Path) -> None:
    other = train(tmp_path / "c.safetensors", "--seed", "4")
    a, b = load_file(str(first_run)), load_file(str(other))
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_the_recorded_command_reproduces_the_weights(first_run: Path, tmp_path: Path) -> None:
    command = json.loads(first_run.with_suffix(".json").read_text())["command"]
    argv = shlex.split(command)
    assert argv[:2] == ["robusteval", "train"]
    replay = tmp_path / "replay.safetensors"
    result = CliRunner().invoke(main, [*argv[1:], "--out", str(replay), "--quiet"])
    assert result.exit_code == 0, result.output
    assert replay.read_bytes() == first_run.read_bytes()


def test_list_models_shows_every_registered_model() -> None:
    result = CliRunner().invoke(main, ["list", "models"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0] for line in result.output.splitlines() if line.strip()}
    assert set(robusteval.list_models()) <= rows
    assert "robustbench:<Name>" in result.output
    as_json = CliRunner().invoke(main, ["list", "models", "--json"])
    cards = json.loads(as_json.output)
    assert [card["name"] for card in cards] == robusteval.list_models()
    standard = next(card for card in cards if card["name"] == "standard")
    assert standard["checkpoints"]["digits"]["sha256"] == robusteval.model_card("standard").checkpoints()["digits"]["sha256"]


def test_unknown_model_suggests_and_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["train", "--model", "standrd", "--out", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 2
    assert "error: unknown model 'standrd'. Did you mean: standard" in result.output
    assert not (tmp_path / "x.safetensors").exists()


def test_train_help_explains_every_option() -> None:
    result = CliRunner().invoke(main, ["train", "--help"])
    assert result.exit_code == 0
    for option in ("--model", "--dataset", "--epochs", "--seed", "--out", "--option", "--quiet"):
        assert option in result.output


def test_saving_the_same_weights_gives_the_same_bytes(tmp_path: Path) -> None:
    from robusteval.core.checkpoints import save_safetensors

    model = robusteval.create_model("standard")
    metadata = {"model": "standard", "dataset": "digits", "note": "order matters to the hash"}
    digests = {save_safetensors(model, tmp_path / f"{i}.safetensors", metadata=metadata) for i in range(12)}
    assert len(digests) == 1
    # The file stays a valid safetensors file with the metadata and the tensors intact.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "0.safetensors"), framework="pt") as handle:
        assert handle.metadata() == metadata
    loaded = load_file(str(tmp_path / "0.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_retraining_a_shipped_model_lands_within_the_stated_tolerance_of_its_record(tmp_path: Path) -> None:
    """The reproduction promise (README): the same bytes on the machine class that made the weights,
    elsewhere the recorded test accuracy within REPRODUCTION_TOLERANCE."""
    from robusteval.model_zoo.registry import WEIGHTS_DIR
    from robusteval.model_zoo.train_model import REPRODUCTION_TOLERANCE

    record = json.loads((WEIGHTS_DIR / "standard-digits.json").read_text())
    argv = shlex.split(record["command"])
    out = tmp_path / "standard.safetensors"
    result = CliRunner().invoke(main, [*argv[1:], "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    retrained = json.loads(out.with_suffix(".json").read_text())
    assert abs(retrained["metrics"]["test_accuracy"] - record["metrics"]["test_accuracy"]) <= REPRODUCTION_TOLERANCE
    assert abs(retrained["metrics"]["train_accuracy"] - record["metrics"]["train_accuracy"]) <= REPRODUCTION_TOLERANCE
    if record.get("cpu_capability") == retrained["cpu_capability"] and record.get("cpu") == retrained["cpu"]:
        assert retrained["sha256"] == record["sha256"]
