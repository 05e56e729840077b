"""The model registry: names, cards, devices, and verified checkpoints."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import robusteval
from robusteval.core import devices
from robusteval.core.checkpoints import CheckpointError, sha256_of
from robusteval.core.names import UnknownNameError
from robusteval.model_zoo import registry

BASELINES = {"standard", "gaussian", "gaussian-s0.12", "gaussian-s0.5", "pgd-at", "dncnn+standard"}


@pytest.fixture(scope="module")
def digits_batch() -> torch.Tensor:
    return robusteval.load_dataset("digits", split="test").x[:8]


@pytest.fixture
def weights_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the shipped `standard` checkpoint and card record, which the registry is pointed at."""
    for suffix in (".safetensors", ".json"):
        shutil.copy(registry.WEIGHTS_DIR / f"standard-digits{suffix}", tmp_path / f"standard-digits{suffix}")
    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path)
    return tmp_path


def test_list_models_filters_with_shell_patterns() -> None:
    everything = robusteval.list_models()
    assert BASELINES <= set(everything)
    assert everything == sorted(everything)
    assert robusteval.list_models("gaussian*") == ["gaussian", "gaussian-s0.12", "gaussian-s0.5"]
    assert robusteval.list_models("*standard") == [n for n in everything if n.endswith("standard")]
    assert "dncnn+standard" in robusteval.list_models("*standard")
    assert robusteval.list_models("no-such-*") == []


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(UnknownNameError) as error:
        robusteval.create_model("standrd")
    message = str(error.value)
    assert "Did you mean: standard" in message
    assert "unknown model 'standrd'" in message
    assert isinstance(error.value, ValueError)  # the CLI maps ValueError to exit code 2
    with pytest.raises(UnknownNameError, match="Did you mean: pgd-at"):
        robusteval.model_card("pgd_at")
    # Lookup is case-insensitive.
    assert robusteval.model_card("STANDARD").name == "standard"


def test_model_cards_say_what_callers_need() -> None:
    card = robusteval.model_card("gaussian-s0.12")
    assert card.recipe.as_dict() == {"sigma": 0.12} and card.recipe.sigma == 0.12
    assert card.capabilities == frozenset({"logits"})
    assert "Cohen" in card.paper
    assert robusteval.model_card("dncnn+standard").capabilities == frozenset({"logits", "denoise"})
    as_dict = robusteval.model_card("standard").as_dict()
    assert {"name", "family", "system", "paper", "capabilities", "checkpoints"} <= set(as_dict)
    record = as_dict["checkpoints"]["digits"]
    assert record["file"] == "standard-digits.safetensors"


@pytest.mark.parametrize("name", robusteval.list_models())
def test_every_shipped_checkpoint_matches_its_card(name: str) -> None:
    for dataset, record in robusteval.model_card(name).checkpoints().items():
        path = registry.WEIGHTS_DIR / record["file"]
        assert path.is_file(), f"{name}/{dataset}: {path} is missing"
        assert sha256_of(path) == record["sha256"]
        assert record["command"].startswith(f"robusteval train --model {name} ")


def test_create_model_honours_the_device(digits_batch: torch.Tensor) -> None:
    model = robusteval.create_model("standard", device="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    # The meta device proves the argument reaches every parameter, without needing a GPU.
    meta = robusteval.create_model("standard", pretrained=False, device=torch.device("meta"))
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert devices.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert devices.resolve_device(torch.device("cpu")) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            robusteval.create_model("standard", device="cuda")


@pytest.mark.parametrize("name", ["tpu", "meta", "mps", "cuda:7", "gpu0", ""])
def test_device_names_that_do_not_exist_here_are_one_clear_error(name: str) -> None:
    if name == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    if name == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(devices.DeviceUnavailable, match=rf"device '{name}'") as caught:
        devices.resolve_device(name)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, ValueError)  # the command line prints it in one line, exit 2


@pytest.mark.cuda
def test_create_model_on_cuda_gives_the_cpu_answer(digits_batch: torch.Tensor) -> None:
    cpu = robusteval.create_model("standard")
    gpu = robusteval.create_model("standard", device="cuda")
    assert gpu.device.type == "cuda"
    with torch.no_grad():
        torch.testing.assert_close(gpu(digits_batch.cuda()).cpu(), cpu(digits_batch), rtol=1e-3, atol=1e-3)


def test_pretrained_weights_are_the_shipped_ones(weights_copy: Path, digits_batch: torch.Tensor) -> None:
    model = robusteval.create_model("standard")
    shipped = {k: v for k, v in _load(weights_copy / "standard-digits.safetensors").items()}
    for key, value in model.state_dict().items():
        assert torch.equal(value, shipped[key]), key
    with torch.no_grad():
        accuracy = (model(digits_batch).argmax(1) == robusteval.load_dataset("digits").y[:8]).float().mean()
    assert float(accuracy) >= 0.75  # a trained digit classifier, not random weights


def test_corrupt_checkpoint_fails_sha256_verification(weights_copy: Path) -> None:
    path = weights_copy / "standard-digits.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte inside a weight: still a valid safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as error:
        robusteval.create_model("standard")
    message = str(error.value)
    assert "sha256" in message and str(path) in message
    assert "robusteval train" in message


def test_missing_shipped_weights_are_a_clear_error(weights_copy: Path) -> None:
    (weights_copy / "standard-digits.json").unlink()
    with pytest.raises(CheckpointError, match="no shipped weights for data set 'digits'") as error:
        robusteval.create_model("standard")
    assert "robusteval train --model standard --dataset digits" in str(error.value)
    assert robusteval.create_model("standard", pretrained=False).num_classes == 10


def test_checkpoint_path_loads_other_weights(tmp_path: Path, digits_batch: torch.Tensor) -> None:
    torch.manual_seed(5)
    source = robusteval.create_model("standard", pretrained=False)
    path = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = robusteval.create_model("standard", checkpoint=path)
    shipped = robusteval.create_model("standard")
    with torch.no_grad():
        assert torch.equal(loaded(digits_batch), source(digits_batch))
        assert not torch.allclose(loaded(digits_batch), shipped(digits_batch))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        robusteval.create_model("standard", checkpoint=tmp_path / "absent.safetensors")


def test_checkpoint_of_another_architecture_names_the_keys(tmp_path: Path) -> None:
    other = robusteval.create_model("dncnn+standard", pretrained=False)
    path = tmp_path / "dncnn.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError) as error:
        robusteval.create_model("standard", checkpoint=path)
    message = str(error.value)
    assert "missing keys" in message and "net.features.0.weight" in message
    assert "unexpected keys" in message and "classifier." in message

    state = robusteval.create_model("standard", pretrained=False).state_dict()
    state["net.head.weight"] = torch.zeros(3, 128)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointError, match=r"shape mismatches \['net.head.weight"):
        robusteval.create_model("standard", checkpoint=path)


def test_truncated_safetensors_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    path.write_bytes((registry.WEIGHTS_DIR / "standard-digits.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        robusteval.create_model("standard", checkpoint=path)


class _RunsCode:
    """Unpickling this object calls os.makedirs: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


class _Options:
    """An arbitrary class, as training scripts pickle their options into checkpoints."""

    def __init__(self, lr: float):
        self.lr = lr


def test_torch_files_load_weights_only(tmp_path: Path, digits_batch: torch.Tensor) -> None:
    torch.manual_seed(6)
    source = robusteval.create_model("standard", pretrained=False)
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, plain)
    with torch.no_grad():
        assert torch.equal(robusteval.create_model("standard", checkpoint=plain)(digits_batch), source(digits_batch))

    # A pickle with arbitrary objects is refused unless the caller opts in.
    with_objects = tmp_path / "with_objects.pt"
    torch.save({"state_dict": source.state_dict(), "options": _Options(0.1)}, with_objects)
    with pytest.raises(CheckpointError, match="allow_unsafe_pickle=True"):
        robusteval.create_model("standard", checkpoint=with_objects)
    loaded = robusteval.create_model("standard", checkpoint=with_objects, allow_unsafe_pickle=True)
    with torch.no_grad():
        assert torch.equal(loaded(digits_batch), source(digits_batch))

    # weights_only really stops code from running on load.
    marker = tmp_path / "code-ran"
    malicious = tmp_path / "malicious.pt"
    torch.save({"state_dict": source.state_dict(), "payload": _RunsCode(marker)}, malicious)
    with pytest.raises(CheckpointError):
        robusteval.create_model("standard", checkpoint=malicious)
    assert not marker.exists()


def test_register_model_rejects_bad_entries() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_model(
            "standard", family="baseline", system="x", paper="x", capabilities={"logits"}
        )(lambda info: None)
    with pytest.raises(ValueError, match="unknown capabilities"):
        registry.register_model("new-model", family="joint", system="x", paper="x", capabilities={"logits", "fly"})
    assert "new-model" not in robusteval.list_models()


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_cards_list_where_the_zoo_departs_from_the_official_code():
    departures = {name: " ".join(robusteval.model_card(name).departures) for name in ("egc", "dmae", "jdm")}
    assert "attention pooling" in departures["egc"] and "per-pixel class map" in departures["egc"]
    assert "per patch" in departures["dmae"] and "extension" in departures["dmae"]
    assert "internal features" in departures["jdm"] and "x_t" in departures["jdm"]
    assert robusteval.model_card("egc").as_dict()["departures"] == list(robusteval.model_card("egc").departures)
