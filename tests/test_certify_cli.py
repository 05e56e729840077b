"""`robusteval certify` and `robusteval predict` on the shipped `gaussian` baseline, with small n."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from robusteval.cli import main

SMALL = ["--model", "gaussian", "--sigma", "0.25", "--n-images", "4", "--device", "cpu", "--no-compile", "--quiet"]


def test_certify_writes_a_run_directory_and_resumes_it(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    args = ["certify", *SMALL, "--n0", "20", "--n", "200", "--skip", "10", "--out", str(out), "--json"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["kind"] == "certify" and summary["model"] == "gaussian" and summary["dataset"] == "digits"
    assert (summary["sigma"], summary["n0"], summary["n"], summary["alpha"], summary["n_images"]) == (
        0.25, 20, 200, 0.001, 4)
    assert summary["certified_accuracy"][0]["radius"] == 0.0
    assert 0.0 <= summary["acr"] and 0.0 <= summary["abstain_rate"] <= 1.0
    assert json.loads((out / "summary.json").read_text()) == summary
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [10, 11, 12, 13]
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "certify" and config["skip"] == 10 and "provenance" in config

    again = runner.invoke(main, args)
    assert again.exit_code == 0 and "resuming" in again.stderr and "4/4 images done" in again.stderr
    assert {k: v for k, v in json.loads(again.stdout).items() if k != "compile"} == {
        k: v for k, v in summary.items() if k != "compile"}


def test_default_run_directory_is_printed_and_predict_works(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["certify", *SMALL, "--n0", "10", "--n", "100"])
    assert result.exit_code == 0, result.output
    line = next(l for l in result.stdout.splitlines() if l.startswith("run: "))
    run_dir = Path(line.removeprefix("run: "))
    assert run_dir.parent == Path("runs") and run_dir.name.startswith("certify-gaussian-digits-s0.25-direct-")
    assert (run_dir / "summary.json").is_file() and "certified accuracy" in result.stdout

    predicted = runner.invoke(main, ["predict", *SMALL, "--n", "100", "--alpha", "0.01", "--json"])
    assert predicted.exit_code == 0, predicted.output
    summary = json.loads(predicted.stdout)
    assert summary["kind"] == "predict" and summary["n"] == 100 and 0.0 <= summary["accuracy"] <= 1.0


def test_cli_errors_are_one_clear_line(tmp_path):
    runner = CliRunner()
    no_denoiser = runner.invoke(main, ["certify", *SMALL, "--mode", "denoised", "--out", str(tmp_path / "x")])
    assert no_denoiser.exit_code == 2
    assert "does not have the capability 'denoise'" in no_denoiser.stderr
    assert not (tmp_path / "x").exists()
    bad_sigma = runner.invoke(main, ["certify", *SMALL, "--sigma", "-1", "--out", str(tmp_path / "y")])
    assert bad_sigma.exit_code == 2 and "sigma must be" in bad_sigma.stderr
    unknown = runner.invoke(main, ["certify", *SMALL, "--model", "gausian", "--out", str(tmp_path / "z")])
    assert unknown.exit_code == 2 and "Did you mean: gaussian" in unknown.stderr


def test_certify_sequential_method(tmp_path):
    runner = CliRunner()
    out = tmp_path / "seq"
    args = ["certify", *SMALL, "--n0", "20", "--method", "sequential", "--radii", "0.25,0.5", "--n-max", "600",
            "--out", str(out)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "draws per image: mean" in result.stdout and "(n_max 600)" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "sequential" and summary["radii"] == [0.25, 0.5] and summary["n_max"] == 600
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(20 <= r["draws"] <= 600 for r in records)
    assert summary["forward_passes"] == sum(r["draws"] for r in records) + 4 * 20
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "sequential" and config["looks"][-1] == 600
    assert config["futility"] == {"chance": 0.02, "alpha": 0.05}
    # --futility 0 draws until decided: a different design, so a different run configuration.
    drawing_on = runner.invoke(main, [*args[:-1], str(tmp_path / "seq0"), "--futility", "0"])
    assert drawing_on.exit_code == 0, drawing_on.output
    assert "futility" not in json.loads((tmp_path / "seq0" / "config.json").read_text())
    bad_futility = runner.invoke(main, [*args[:-1], str(tmp_path / "seq1"), "--futility", "1"])
    assert bad_futility.exit_code == 2 and "futility must be a chance in [0, 1)" in bad_futility.stderr
    # CERTIFY's run configurations do not mention the method, so their run directories are unchanged.
    cohen = runner.invoke(main, ["certify", *SMALL, "--n0", "20", "--n", "100", "--out", str(tmp_path / "c")])
    assert cohen.exit_code == 0, cohen.output
    assert "method" not in json.loads((tmp_path / "c" / "config.json").read_text())
    mixed = runner.invoke(main, ["certify", *SMALL, "--n", "100", "--n-max", "600", "--out", str(tmp_path / "m")])
    assert mixed.exit_code == 2 and "sequential" in mixed.stderr
    bad = runner.invoke(main, ["certify", *SMALL, "--method", "sequential", "--radii", "0.25,x",
                               "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "--radii: expected comma-separated numbers" in bad.output


def test_sequential_design_is_chosen_on_the_command_line_and_recorded(tmp_path):
    runner = CliRunner()
    configs = {}
    for design in ("spending", "betting"):
        out = tmp_path / design
        args = ["certify", *SMALL, "--method", "sequential", "--radii", "0.25", "--n-max", "300",
                "--design", design, "--out", str(out), "--json"]
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
        configs[design] = json.loads((out / "config.json").read_text())
    differing = {k for k in configs["spending"] if configs["spending"][k] != configs["betting"].get(k)}
    assert {"confidence_sequence", "alpha_spent"} <= differing  # the design is part of what identifies the run
    refused = runner.invoke(main, ["certify", *SMALL, "--design", "betting"])
    assert refused.exit_code == 2 and "design" in refused.output


# === the command as the design names it (issue 28) ================================================
def test_certify_without_model_certifies_the_zoo_base_classifier_for_sigma(tmp_path):
    cheap = ["--n-images", "2", "--n0", "10", "--n", "50", "--device", "cpu", "--no-compile", "--quiet"]
    for sigma, expected in (("0.25", "gaussian"), ("0.5", "gaussian-s0.5"), ("0.1", "gaussian-s0.12")):
        out = tmp_path / f"s{sigma}"
        result = CliRunner().invoke(main, ["certify", "--sigma", sigma, *cheap, "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert f"model: {expected} (default" in result.stderr
        assert f"of {expected}: r=0:" in result.stdout
        assert json.loads((out / "config.json").read_text())["model"] == expected
    # σ between two trained levels: the nearest, and the output says so.
    nearest = CliRunner().invoke(main, ["certify", "--sigma", "0.3", *cheap, "--out", str(tmp_path / "s0.3")])
    assert nearest.exit_code == 0 and "σ = 0.25, the nearest to --sigma 0.3" in nearest.stderr
    predict = CliRunner().invoke(main, ["predict", "--sigma", "0.12", "--n-images", "2", "--n", "20",
                                        "--no-compile", "--quiet", "--out", str(tmp_path / "p")])
    assert predict.exit_code == 0 and "gaussian-s0.12: smoothed accuracy" in predict.stdout


def test_certify_model_all_prints_one_table_of_every_model_with_shipped_weights(tmp_path):
    from robusteval.model_zoo.factory import shipped_models

    result = CliRunner().invoke(main, ["certify", "--model", "all", "--sigma", "0.25", "--n-images", "1", "--n0",
                                       "5", "--n", "20", "--no-compile", "--quiet", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    table = result.stdout.splitlines()
    assert table[0].startswith("certified accuracy (1 images, σ=0.25, direct")
    assert [line.split()[0] for line in table[3:]] == shipped_models("digits")
    assert {p.name for p in tmp_path.iterdir()} == set(shipped_models("digits"))
    predict = CliRunner().invoke(main, ["predict", "--model", "all", "--sigma", "0.25", "--n-images", "1"])
    assert predict.exit_code == 2 and "--model all applies to certify" in predict.output


@pytest.mark.slow
def test_the_bare_certify_command_exits_0_and_names_the_model(tmp_path, monkeypatch):
    """`robusteval certify --sigma 0.25`, typed as is: the design's command (about a minute on 2 cores)."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["certify", "--sigma", "0.25"])
    assert result.exit_code == 0, result.output
    assert "model: gaussian (default" in result.stderr and "of gaussian: r=0:" in result.stdout
    assert "images: the first 200 test images" in result.stderr
    (summary,) = tmp_path.glob("runs/*/summary.json")
    assert json.loads(summary.read_text())["n_images"] == 200


def test_every_kth_image_is_certified_and_attacked_recorded_and_refused_where_not_recorded(tmp_path):
    """--every K (Cohen et al.'s --skip, DMAE's --sample_interval): images 0, K, 2K, ... of the test split."""
    from cli_helpers import one_line_error

    from robusteval.data import load_dataset

    runner = CliRunner()
    out = tmp_path / "every"
    result = runner.invoke(main, ["certify", *SMALL, "--n0", "10", "--n", "50", "--every", "5", "--skip", "1",
                                  "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    digits = load_dataset("digits")
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    # --skip and --n-images count the images taken: positions 1..4 of every 5th, i.e. test images 5, 10, 15, 20.
    assert [r["label"] for r in records] == digits.y[5:25:5].tolist()
    assert json.loads((out / "config.json").read_text())["every"] == 5
    plain = tmp_path / "plain"
    assert runner.invoke(main, ["certify", *SMALL, "--n0", "10", "--n", "50", "--out", str(plain)]).exit_code == 0
    assert "every" not in json.loads((plain / "config.json").read_text())  # unchanged configurations and hashes
    attacked = tmp_path / "attack"
    result = runner.invoke(main, ["run", "--model", "gaussian", "--attack", "fgsm", "--eps", "0.1", "--n", "3",
                                  "--every", "7", "--device", "cpu", "--no-large-eps-check", "--no-masking-checks",
                                  "--quiet", "--out", str(attacked)])
    assert result.exit_code == 0, result.output
    assert json.loads((attacked / "config.json").read_text())["every"] == 7
    labels = [json.loads(line)["label"] for line in (attacked / "samples.jsonl").read_text().splitlines()]
    assert labels == digits.y[0:21:7].tolist()
    one_line_error(runner.invoke(main, ["denoise", "--model", "cdn", "--n-images", "2", "--every", "2",
                                        "--device", "cpu"]),
                   "--every applies to run, certify and predict only")
    one_line_error(runner.invoke(main, ["benchmark", "--suite", "digits-ci", "--every", "2",
                                        "--out", str(tmp_path / "b")]), "a grid suite evaluates its own images")
    one_line_error(runner.invoke(main, ["certify", *SMALL, "--every", "0", "--out", str(tmp_path / "z")]),
                   "every must be a whole number of images >= 1")
