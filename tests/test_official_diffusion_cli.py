"""The official jdm and egc files through `create_model` and every command that takes `--checkpoint`.

Synthetic files of small configurations in the official layout (builders of
test_official_diffusion.py), miniature cifar-10-batches-py and ImageNet
folders; numbers are checked against the reference forwards written there
from the state dicts alone.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_data_cifar100_imagenet import make_imagenet
from test_official_checkpoints import make_cifar10
from test_official_diffusion import (
    TINY_EGC,
    TINY_EGC_OPTIONS,
    ref_encode_mean,
    ref_sattn_pool,
    ref_unet,
    save_egc,
    save_jdm,
)

import robusteval
from robusteval.cli import main
from robusteval.core.checkpoints import CheckpointError
from robusteval.core.errors import UsageError
from robusteval.core.interface import trusted_inputs
from robusteval.model_zoo.official.egc import OfficialEGC
from robusteval.model_zoo.official.guided_unet import UNetConfig
from robusteval.model_zoo.official.jdm import OfficialJointDiffusion
from robusteval.model_zoo.official.kl_autoencoder import AutoencoderConfig

# Two levels at 32×32 (attention at 16×16 only) keep the CPU time of the commands small.
JDM_CIFAR = UNetConfig(model_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_ds=(2,), num_heads=4)
# A KL-f8 autoencoder (as the released one) so that ImageNet's 224² crops become 28×28 latents.
VAE_F8 = AutoencoderConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, attn_levels=(), z_channels=4, embed_dim=4)


@pytest.fixture(scope="module")
def jdm_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("jdm")
    path, _ = save_jdm(root, JDM_CIFAR, seed=5)
    config = root / "flags.json"
    # The official command's flags; diffusion_steps shortened (its linear β need T > 50): sampling runs 100 steps.
    config.write_text(json.dumps({"num_heads": 4, "diffusion_steps": 100, "noise_schedule": "linear", "lr": 1e-4}))
    return {"checkpoint": path, "config": config, "data": make_cifar10(root / "data")}


def jdm_args(files: dict[str, Path], *extra: str) -> list[str]:
    return ["--model", "jdm", "--dataset", "cifar10", "--checkpoint", str(files["checkpoint"]), "--model-config",
            str(files["config"]), "--device", "cpu", *extra]


def test_jdm_loads_through_create_model_with_the_reference_logits(jdm_files: dict[str, Path]) -> None:
    state = torch.load(jdm_files["checkpoint"], weights_only=True)
    assert "clasifier.bn_1.running_mean" in state and "input_blocks.0.0.weight" in state
    model = robusteval.create_model("jdm", dataset="cifar10", checkpoint=jdm_files["checkpoint"],
                                    model_config=jdm_files["config"])
    assert isinstance(model, OfficialJointDiffusion) and model.name == "jdm" and not model.training
    assert model.schedule.num_timesteps == 100  # from --model-config
    x = robusteval.load_dataset("cifar10", root=jdm_files["data"]).x[:3]
    _, reference = ref_unet(state, (x - 0.5) / 0.5, torch.zeros(3), heads=4, num_res_blocks=1)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(x), reference, atol=1e-5, rtol=1e-5)
    # Without flags, what shapes cannot tell is the official CIFAR-10 command's: 1,000 steps.
    plain = robusteval.create_model("jdm", dataset="cifar10", checkpoint=jdm_files["checkpoint"])
    assert plain.schedule.num_timesteps == 1000


def test_jdm_run_through_its_denoiser_finishes_with_the_pipelines_clean_accuracy(jdm_files: dict[str, Path],
                                                                                   tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", *jdm_args(jdm_files), "--data-dir", str(jdm_files["data"]),
                                       "--defense", "denoise:0.25", "--gradient", "full", "--attack", "pgd",
                                       "--steps", "2", "--n", "3", "--eps", "0.01", "--no-large-eps-check",
                                       "--no-masking-checks", "--quiet", "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["model"], summary["dataset"], summary["n"], summary["defense"]) == ("jdm", "cifar10", 3,
                                                                                         "denoise:0.25")
    model = robusteval.create_model("jdm", dataset="cifar10", checkpoint=jdm_files["checkpoint"],
                                    model_config=jdm_files["config"])
    data = robusteval.load_dataset("cifar10", root=jdm_files["data"])
    with torch.no_grad(), trusted_inputs():
        predicted = model.logits(model.denoise(data.x[:3], 0.25)).argmax(1)
    assert summary["clean_accuracy"] == pytest.approx(float((predicted == data.y[:3]).float().mean()))
    config = json.loads((out / "config.json").read_text())
    assert config["model_config"] == str(jdm_files["config"]) and "vae" not in config


def test_jdm_certify_in_denoised_mode_finishes(jdm_files: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["certify", *jdm_args(jdm_files), "--data-dir", str(jdm_files["data"]),
                                       "--mode", "denoised", "--sigma", "0.25", "--n-images", "2", "--n0", "4",
                                       "--n", "8", "--batch-size", "16", "--no-compile", "--quiet", "--json",
                                       "--out", str(tmp_path / "certify")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["model"], summary["mode"], summary["n_images"]) == ("jdm", "denoised", 2)
    assert len((tmp_path / "certify" / "samples.jsonl").read_text().splitlines()) == 2


def test_jdm_counterfactual_without_standard_weights_is_judged_by_the_model(jdm_files: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    out = tmp_path / "cf.png"
    result = CliRunner().invoke(main, ["counterfactual", *jdm_args(jdm_files), "--data-dir", str(jdm_files["data"]),
                                       "--n", "2", "--target", "3", "--t-start", "0.1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 counterfactuals of jdm; jdm itself (no standard weights for cifar10) predicts the target" in result.output


def test_jdm_sample_writes_a_grid(jdm_files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "samples.png"
    result = CliRunner().invoke(main, ["sample", *jdm_args(jdm_files), "--n", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "2 class-conditional samples of jdm" in result.output


def test_jdm_official_file_on_mnist_and_own_weights_stay_the_re_implementation(tmp_path: Path) -> None:
    config = UNetConfig(in_channels=1, out_channels=1, model_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2),
                        attention_ds=(1,))
    path, state = save_jdm(tmp_path, config, seed=7)
    model = robusteval.create_model("jdm", dataset="mnist", checkpoint=path)
    assert isinstance(model, OfficialJointDiffusion)
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    _, reference = ref_unet(state, (x - 0.5) / 0.5, torch.zeros(2), heads=4, num_res_blocks=1)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(x), reference, atol=1e-5, rtol=1e-5)
    # Without a paper's file, mnist keeps robusteval's own (trainable) jdm.
    assert not isinstance(robusteval.create_model("jdm", dataset="mnist", pretrained=False), OfficialJointDiffusion)
    assert isinstance(robusteval.create_model("jdm", dataset="mnist", pretrained=False, official=True),
                      OfficialJointDiffusion)



def test_jdm_presets_feed_the_published_schedule_and_an_assumed_one_is_said_and_recorded(
        jdm_files: dict[str, Path], tmp_path: Path, caplog) -> None:
    from robusteval.attacks.evaluate import prepare_attack
    from robusteval.model_zoo.official.schedule import (
        DiscreteSchedule,
        jdm_linear_betas,
    )

    config = UNetConfig(in_channels=1, out_channels=1, model_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2),
                        attention_ds=(1,))
    path, _ = save_jdm(tmp_path, config, seed=7)
    with caplog.at_level("WARNING"):
        model = robusteval.create_model("jdm", dataset="fashion-mnist", checkpoint=path,
                                        model_config="preset:fashion-mnist")
    assert "assuming" not in caplog.text and model.assumed_config is None
    assert model.schedule.num_timesteps == 500
    # denoise:0.25 feeds the timestep whose ᾱ is 1/(1 + 4σ²) = 0.8 on the 500-step schedule, not the 1,000-step one.
    seen = []
    real_eps = model.eps
    model.eps = lambda x_t, t: seen.append(t.clone()) or real_eps(x_t, t)
    with torch.no_grad():
        model.denoise(torch.rand(2, 1, 28, 28), 0.25)
    sigma = torch.tensor([0.25])
    assert torch.allclose(seen[0].cpu(), model.schedule.matched_timestep(sigma).expand(2))
    assert float(model.schedule.alpha_bar(seen[0][:1])) == pytest.approx(0.8, abs=1e-6)
    thousand = DiscreteSchedule(jdm_linear_betas(1000)).matched_timestep(sigma)
    assert abs(float(thousand) - float(seen[0][0])) > 20  # the 1,000-step assumption feeds another t
    with pytest.raises(UsageError, match="preset:cifar10, preset:fashion-mnist"):
        robusteval.create_model("jdm", dataset="fashion-mnist", checkpoint=path, model_config="preset:mnist")
    # Without --model-config the assumed steps and schedule are said and recorded.
    caplog.clear()
    with caplog.at_level("WARNING"):
        job = prepare_attack("jdm", "cifar10", attack="fgsm", eps=[0.01], n=2, device="cpu",
                             checkpoint=jdm_files["checkpoint"], data_dir=jdm_files["data"])
    assert "assuming the official CIFAR-10 command's diffusion_steps 1000, noise_schedule linear" in caplog.text
    assert job.model.assumed_config == {"diffusion_steps": 1000, "noise_schedule": "linear"}
    assert job.config["model_config"] == 'assumed {"diffusion_steps": 1000, "noise_schedule": "linear"}'
    given = prepare_attack("jdm", "cifar10", attack="fgsm", eps=[0.01], n=2, device="cpu",
                           checkpoint=jdm_files["checkpoint"], data_dir=jdm_files["data"],
                           model_config="preset:cifar10")
    assert given.config["model_config"] == "preset:cifar10" and given.model.assumed_config is None

# --- egc ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def egc_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("egc")
    net, _, vae, _ = save_egc(root, config=replace(TINY_EGC, out_channels=1000),
                              options=replace(TINY_EGC_OPTIONS, num_classes=1000), vae=VAE_F8, seed=4)
    config = root / "egc.json"
    config.write_text(json.dumps({"num_heads": 2}))  # shapes show heads × width = 32 only
    make_imagenet(root / "imagenet")
    return {"checkpoint": net, "vae": vae, "config": config, "data": root / "imagenet"}


def test_egc_loads_through_create_model_with_the_reference_logits(egc_files: dict[str, Path]) -> None:
    model = robusteval.create_model("egc", dataset="imagenet", checkpoint=egc_files["checkpoint"],
                                    vae=egc_files["vae"], model_config={"num_heads": 2})
    assert isinstance(model, OfficialEGC) and model.capabilities == {"logits", "energy", "sample"}
    assert model.latent_shape == (4, 28, 28)
    x = robusteval.load_dataset("imagenet", root=egc_files["data"], limit=2).x
    state = torch.load(egc_files["checkpoint"], weights_only=True)
    vae_state = torch.load(egc_files["vae"], weights_only=True)
    z = 0.18215 * ref_encode_mean(vae_state, 2 * x - 1)
    null = state["label_emb.weight"][-1].expand(2, 1, -1)
    out_map, _ = ref_unet(state, z, torch.zeros(2), heads=2, num_res_blocks=1, context=null)
    with torch.no_grad():
        logits = model.logits(x)
    assert logits.shape == (2, 1000)
    torch.testing.assert_close(logits, ref_sattn_pool(out_map), atol=1e-4, rtol=1e-4)
    with pytest.raises(CheckpointError, match="--vae FILE"):
        robusteval.create_model("egc", dataset="imagenet", checkpoint=egc_files["checkpoint"])


def test_egc_run_finishes_on_two_imagenet_images(egc_files: dict[str, Path], tmp_path: Path) -> None:
    common = ["--model", "egc", "--dataset", "imagenet", "--data-dir", str(egc_files["data"]), "--checkpoint",
              str(egc_files["checkpoint"]), "--model-config", str(egc_files["config"]), "--device", "cpu"]
    result = CliRunner().invoke(main, ["run", *common, "--vae", str(egc_files["vae"]), "--attack", "pgd", "--steps",
                                       "2", "--n", "2", "--eps", "0.01", "--no-large-eps-check",
                                       "--no-masking-checks", "--quiet", "--json", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["model"], summary["dataset"], summary["n"]) == ("egc", "imagenet", 2)
    # EGC's own protocol by default: resize 256, centre crop 256, so 32×32 latents; recorded in the run.
    assert json.loads((tmp_path / "run" / "config.json").read_text())["preprocessing"] == "Res256Crop256"
    model = robusteval.create_model("egc", dataset="imagenet", checkpoint=egc_files["checkpoint"],
                                    vae=egc_files["vae"], model_config=egc_files["config"], image_size=256)
    assert model.latent_shape == (4, 32, 32)
    data = robusteval.load_dataset("imagenet", root=egc_files["data"], limit=2, preprocessing="Res256Crop256")
    with torch.no_grad():
        expected = (model.logits(data.x).argmax(1) == data.y).float().mean()
    assert summary["clean_accuracy"] == pytest.approx(float(expected))
    missing = CliRunner().invoke(main, ["run", *common, "--attack", "fgsm", "--n", "2", "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "--vae FILE" in missing.output
    denoised = CliRunner().invoke(main, ["certify", *common, "--vae", str(egc_files["vae"]), "--mode", "denoised",
                                         "--sigma", "0.25", "--n-images", "1", "--out", str(tmp_path / "c")])
    assert denoised.exit_code == 2 and "denoise" in denoised.output



def test_imagenet_preprocessing_is_an_option_every_job_records(egc_files: dict[str, Path]) -> None:
    from robusteval.attacks.evaluate import prepare_attack

    options = {"checkpoint": egc_files["checkpoint"], "vae": egc_files["vae"], "model_config": egc_files["config"],
               "data_dir": egc_files["data"], "device": "cpu"}
    own = prepare_attack("egc", "imagenet", attack="fgsm", eps=[0.01], n=2, **options)
    assert own.model.latent_shape == (4, 32, 32) and own.x.shape[1:] == (3, 256, 256)
    assert own.config["preprocessing"] == "Res256Crop256"
    robustbench = prepare_attack("egc", "imagenet", attack="fgsm", eps=[0.01], n=2, preprocessing="res256crop224",
                                 **options)
    assert robustbench.model.latent_shape == (4, 28, 28) and robustbench.x.shape[1:] == (3, 224, 224)
    assert robustbench.config["preprocessing"] == "Res256Crop224"
    assert robustbench.config_hash != own.config_hash
    standard = prepare_attack("standard", "digits", attack="fgsm", eps=[0.1], n=2, device="cpu")
    assert "preprocessing" not in standard.config  # other data sets: nothing recorded, their hashes unchanged
    with pytest.raises(UsageError, match="imagenet only"):
        prepare_attack("standard", "digits", attack="fgsm", eps=[0.1], n=2, preprocessing="Crop288")

@pytest.mark.parametrize("command", [["run", "--attack", "fgsm", "--n", "1"],
                                     ["certify", "--sigma", "0.25", "--n-images", "1"],
                                     ["predict", "--sigma", "0.25", "--n-images", "1"],
                                     ["sample", "--n", "1"], ["counterfactual", "--n", "1"]])
def test_every_command_hands_the_model_config_to_the_loader(command: list[str], jdm_files: dict[str, Path],
                                                            tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"noise_schedule": "quadratic"}))
    args = ["--model", "jdm", "--dataset", "cifar10", "--checkpoint", str(jdm_files["checkpoint"]), "--model-config",
            str(bad), "--device", "cpu", "--out", str(tmp_path / "out")]
    if command[0] != "sample":
        args += ["--data-dir", str(jdm_files["data"])]
    result = CliRunner().invoke(main, [*command, *args])
    assert result.exit_code == 2 and "--model-config: 'noise_schedule' must be 'linear' or 'cosine'" in result.output, \
        result.output


def test_companion_files_are_refused_where_nothing_reads_them(jdm_files: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["sample", "--model", "jem", "--vae", str(jdm_files["config"]), "--device",
                                       "cpu", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "--vae applies to the official architectures" in result.output
    with pytest.raises(ValueError, match="--vae: the official 'jdm' loader takes no such file"):
        robusteval.create_model("jdm", dataset="cifar10", checkpoint=jdm_files["checkpoint"],
                                vae=jdm_files["config"])


def test_model_cards_describe_the_diffusion_rows() -> None:
    cards = {card["name"]: card for card in json.loads(CliRunner().invoke(main, ["list", "models", "--json"]).stdout)}
    jdm, egc = cards["jdm"]["official"], cards["egc"]["official"]
    assert jdm["repository"] == "https://github.com/KamilDeja/joint_diffusion"
    assert jdm["datasets"] == ["cifar10", "cifar100", "mnist", "fashion-mnist"]
    assert jdm["capabilities"] == ["denoise", "logits", "sample"] and jdm["options"] == ["model_config"]
    assert egc["datasets"] == ["imagenet"] and egc["options"] == ["vae", "model_config"]
    assert "denoise" not in egc["capabilities"] and "latent" in egc["not_offered"]["denoise"]
    assert any("256" in line for line in egc["unsettled"]) and jdm["unsettled"]
    card = robusteval.model_card("egc")
    assert "denoise" in card.capabilities_for("digits") and "denoise" not in card.capabilities_for("imagenet")
