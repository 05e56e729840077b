"""Recipes are typed and checked when a model registers; the training layer sits below the zoo, `train` above."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

import robusteval
from robusteval.cli import main
from robusteval.model_zoo.baselines import (
    CNNClassifier,
    GaussianRecipe,
    train_gaussian,
    train_standard,
)
from robusteval.model_zoo.cdn import CDNRecipe
from robusteval.model_zoo.gmmc import GMMC_RECIPE, GMMCRecipe
from robusteval.model_zoo.registry import WEIGHTS_DIR, register_model
from robusteval.training import DiffusionRecipe, Recipe, SGLDRecipe

PACKAGE = Path(robusteval.__file__).parent


def _register(name: str, **kwargs) -> None:
    register_model(name, family="baseline", system="test", paper="test", capabilities={"logits"}, **kwargs)(CNNClassifier)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: CDNRecipe(sigma_min=2.0), r"CDNRecipe: sigma_max must be > sigma_min = 2.0, got 1.0"),
        (lambda: CDNRecipe(sigma_min=0.0), r"CDNRecipe: sigma_min must be > 0, got 0.0"),
        (lambda: DiffusionRecipe(ema_decay=1.0), r"DiffusionRecipe: ema_decay must be in \[0, 1\), got 1.0"),
        (lambda: DiffusionRecipe(batch_size=64.5), r"DiffusionRecipe: batch_size must be int, got 64.5"),
        (lambda: DiffusionRecipe(lr="fast"), r"DiffusionRecipe: lr must be float, got 'fast'"),
        (lambda: DiffusionRecipe(batch_size=True), r"batch_size must be int, got True"),
        (lambda: SGLDRecipe(reinit=1.5), r"SGLDRecipe: reinit must be in \[0, 1\], got 1.5"),
        (lambda: SGLDRecipe(sgld_steps=-1), r"SGLDRecipe: SGLD steps must be >= 0, got -1"),
        (lambda: GMMCRecipe(mode="joitn"), r"mode must be one of discriminative, generative, joint, got 'joitn'"),
        (lambda: GaussianRecipe(sigma=-0.25), r"GaussianRecipe: sigma must be > 0, got -0.25"),
    ],
)
def test_a_bad_recipe_cannot_be_made(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_registration_rejects_a_recipe_that_is_not_a_recipe_dataclass() -> None:
    with pytest.raises(ValueError, match=r"model 'bad-dict': the recipe must be a frozen Recipe dataclass .* got dict"):
        _register("bad-dict", trainer=train_gaussian, recipe={"sigma": 0.25})
    assert "bad-dict" not in robusteval.list_models()


def test_registration_checks_the_recipe_again() -> None:
    # A frozen recipe changed behind its back (object.__setattr__ skips the checks) is caught at registration.
    recipe = GaussianRecipe(sigma=0.25)
    object.__setattr__(recipe, "sigma", 0.0)
    with pytest.raises(ValueError, match=r"model 'bad-sigma': bad training recipe: GaussianRecipe: sigma must be > 0"):
        _register("bad-sigma", trainer=train_gaussian, recipe=recipe)
    assert "bad-sigma" not in robusteval.list_models()


def test_registration_rejects_a_recipe_without_a_trainer_and_zero_default_epochs() -> None:
    with pytest.raises(ValueError, match=r"model 'no-trainer': a recipe needs a trainer"):
        _register("no-trainer", recipe=GaussianRecipe())
    with pytest.raises(ValueError, match=r"model 'no-epochs': default_epochs must be at least 1, got 0"):
        _register("no-epochs", trainer=train_standard, default_epochs=0)
    assert not {"no-trainer", "no-epochs"} & set(robusteval.list_models())


def test_a_trainer_handed_another_kind_of_recipe_fails_before_training() -> None:
    import torch

    from robusteval.training import TrainContext

    data = robusteval.load_dataset("digits", split="train")
    model = CNNClassifier(robusteval.data.dataset_info("digits"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    context = TrainContext(1, 0, torch.Generator().manual_seed(0), False, SGLDRecipe())
    with pytest.raises(TypeError, match="this trainer needs a GaussianRecipe, got SGLDRecipe"):
        train_gaussian(model, data, context)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_options_override_by_name_with_the_same_checks() -> None:
    recipe = GMMC_RECIPE.with_options({"mode": "generative", "lr": 1})
    assert (recipe.mode, recipe.lr, type(recipe.lr)) == ("generative", 1.0, float)
    assert recipe.sgld_step_size == GMMC_RECIPE.sgld_step_size  # the rest is kept
    assert GMMC_RECIPE.mode == "joint"  # frozen: the original is untouched
    with pytest.raises(ValueError, match=r"unknown recipe option\(s\) sgld_stpes for GMMCRecipe \(options: batch_size, lr,"):
        GMMC_RECIPE.with_options({"sgld_stpes": 5})
    with pytest.raises(ValueError, match="GMMCRecipe: mode must be one of"):
        GMMC_RECIPE.with_options({"mode": "both"})
    with pytest.raises(ValueError, match="unknown recipe option"):
        Recipe().with_options({"lr": 0.1})


def test_the_train_command_rejects_a_bad_option_with_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    result = CliRunner().invoke(main, ["train", "--model", "gaussian", "--option", "sigma=-1", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "GaussianRecipe: sigma must be > 0, got -1.0" in result.output
    result = CliRunner().invoke(main, ["train", "--model", "standard", "--option", "lr=0.1", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "unknown recipe option(s) lr for Recipe (options: none)" in result.output
    assert not out.exists()


def test_a_recipe_reads_as_its_json_options() -> None:
    recipe = robusteval.model_card("dmae").recipe
    assert recipe["finetune_sigmas"] == [0.0, 0.25, 0.5] and recipe.finetune_sigmas == (0.0, 0.25, 0.5)
    assert json.loads(json.dumps(recipe.as_dict())) == recipe.as_dict()
    assert recipe.get("sigma") is None and "lr" in recipe and len(Recipe()) == 0 and not Recipe()
    with pytest.raises(KeyError):
        recipe["check"]  # methods are not options


@pytest.mark.parametrize("record_path", sorted(WEIGHTS_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_each_card_holds_the_recipe_its_shipped_weights_were_trained_with(record_path: Path) -> None:
    # Changing a default silently would make `robusteval train` stop reproducing the shipped file.
    record = json.loads(record_path.read_text())
    assert robusteval.model_card(record["model"]).recipe.as_dict() == record["recipe"]


def test_a_subclass_recipe_adds_typed_options() -> None:
    @dataclass(frozen=True)
    class Wider(DiffusionRecipe):
        width: int = 8

        def check(self) -> None:
            super().check()
            self._require_positive("width")

    assert Wider().as_dict() == {**DiffusionRecipe().as_dict(), "width": 8}
    with pytest.raises(ValueError, match="Wider: width must be > 0, got 0"):
        Wider(width=0)
    with pytest.raises(ValueError, match="Wider: lr must be > 0"):
        Wider(lr=0.0)


# --- layering ------------------------------------------------------------------------------------
def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_training_helpers_import_nothing_above_them() -> None:
    files = sorted((PACKAGE / "training").glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "context.py", "loops.py", "recipes.py", "sgld.py"}
    for path in files:
        above = {m for m in _imported_modules(path) if m.startswith(("robusteval.model_zoo", "robusteval.model_zoo.train_model"))}
        assert not above, f"{path.name} imports {sorted(above)}"


def test_the_zoo_never_imports_the_train_command() -> None:
    for path in sorted((PACKAGE / "model_zoo").glob("*.py")):
        assert not any(m.startswith("robusteval.model_zoo.train_model") for m in _imported_modules(path)), path.name


def test_importing_the_zoo_does_not_load_the_train_command() -> None:
    code = (
        "import sys, robusteval.model_zoo, robusteval.training.loops\n"
        "import robusteval\n"
        "robusteval.create_model('cdn')\n"
        "assert 'robusteval.model_zoo.train_model' not in sys.modules, 'the zoo imported the train command'\n"
        "import robusteval.model_zoo.train_model\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_an_override_is_trained_with_and_recorded_so_the_command_replays_it(tmp_path: Path) -> None:
    import shlex

    from robusteval.model_zoo.train_model import train_model

    result = train_model("gaussian", epochs=1, out=tmp_path / "g.safetensors", progress=False, options={"sigma": 0.3})
    assert result.record["recipe"] == {"sigma": 0.3}
    assert result.record["command"].endswith("--epochs 1 --seed 0 --option sigma=0.3")
    replay = tmp_path / "replay.safetensors"
    argv = shlex.split(result.record["command"])[1:]
    replayed = CliRunner().invoke(main, [*argv, "--out", str(replay), "--quiet"])
    assert replayed.exit_code == 0, replayed.output
    assert replay.read_bytes() == result.weights.read_bytes()
    # A list option is written without spaces, so the recorded command stays one shell word per option.
    from robusteval.model_zoo.train_model import _option_text

    assert _option_text([0.0, 0.5]) == "[0.0,0.5]" and _option_text("joint") == "joint"


def test_the_diffusion_style_loop_ends_on_the_moving_average_of_its_weights() -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from robusteval.data import ImageDataset
    from robusteval.training import TrainContext
    from robusteval.training.loops import (
        DiffusionLosses,
        FigureNames,
        train_diffusion_style,
    )

    data = robusteval.load_dataset("digits", split="train")
    subset = ImageDataset(data.name, "train", data.x[:32], data.y[:32], data.classes)  # one batch per epoch

    def run(ema_decay: float) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, float]]:
        torch.manual_seed(0)
        model = nn.Module()
        model.net = nn.Linear(64, 10)
        before_each_step: list[torch.Tensor] = []

        def objective(x: torch.Tensor, y: torch.Tensor) -> DiffusionLosses:
            before_each_step.append(model.net.weight.detach().clone())
            logits = model.net(x.flatten(1))
            return DiffusionLosses(logits.pow(2).mean(), F.cross_entropy(logits, y), logits)

        recipe = DiffusionRecipe(batch_size=32, lr=0.05, ema_decay=ema_decay, ce_weight=0.5)
        context = TrainContext(3, 0, torch.Generator().manual_seed(0), False, recipe)
        figures = train_diffusion_style(model, model.net, subset, context, recipe, objective, "t", FigureNames("mse", "acc"))
        return before_each_step, model.net.weight.detach().clone(), figures

    trajectory, last, figures = run(0.0)  # no averaging: the last weights
    assert set(figures) == {"train_mse", "train_ce", "train_acc"}
    averaged_trajectory, averaged, _ = run(0.5)
    # The average never feeds back into training: both runs take the same steps.
    assert all(torch.equal(a, b) for a, b in zip(trajectory, averaged_trajectory))
    w0, w1, w2 = trajectory
    expected = w0
    for weights in (w1, w2, last):
        expected = 0.5 * expected + 0.5 * weights
    assert torch.allclose(averaged, expected, atol=1e-6) and not torch.allclose(averaged, last, atol=1e-4)
