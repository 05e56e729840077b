"""RobustBench model_info entries: RobustBench's own format, read back by its own dataclass and conventions."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from reports_fixtures import FIXTURE_RUNS, copy_run, fixture_summary

from robusteval.reports.loading import load_runs
from robusteval.reports.robustbench import (
    entry_name,
    eps_string,
    forward_passes,
    robustbench_entries,
    write_robustbench,
)


@pytest.fixture(scope="module")
def runs():
    return load_runs([FIXTURE_RUNS])


def test_one_entry_per_dataset_norm_and_system_with_an_autoattack_run(runs):
    entries = robustbench_entries(runs)
    assert sorted(map(str, entries)) == [
        "model_info/digits/L2/gaussian.json", "model_info/digits/L2/standard.json",
        "model_info/digits/Linf/gaussian.json", "model_info/digits/Linf/standard.json",
        "model_info/digits/Linf/toy-joint.json",
    ]  # toy-joint + denoise:0.25 has only a PGD run: no AutoAttack figure, no entry


def test_entry_fields_follow_robustbench(runs):
    from robustbench.utils import ModelInfo

    entries = robustbench_entries(runs, eps_overrides={"Linf": 0.05})
    standard = entries[Path("model_info/digits/Linf/standard.json")]
    aa, pgd = fixture_summary("standard-autoattack-Linf"), fixture_summary("standard-pgd-Linf")
    assert standard["clean_acc"] == "97.50"
    assert standard["autoattack_acc"] == f"{100 * aa['curve'][0]['robust_accuracy']:.2f}" == "37.50"
    assert standard["external"] == f"{100 * pgd['curve'][0]['robust_accuracy']:.2f}" == "35.00"  # best known: PGD
    assert standard["eps"] == "0.05" and standard["unreliable"] is False
    assert standard["additional_data"] is False and standard["number_forward_passes"] == 1
    assert standard["name"] == "Standard CNN" and standard["venue"] == "N/A"
    assert standard["architecture"].startswith("CNNClassifier (")
    # Every ModelInfo field is present and RobustBench's dataclass accepts the entry.
    fields = {f.name for f in dataclasses.fields(ModelInfo)}
    known = {k: v for k, v in standard.items() if k in fields}
    assert set(fields) - set(standard) <= {"corruptions_acc", "corruptions_acc_3d", "corruptions_mce",
                                           "corruptions_mce_3d"}
    ModelInfo(**known)
    # RobustBench's leaderboard code reads accuracies as float(string) / 100.
    assert float(standard["autoattack_acc"]) / 100 == aa["curve"][0]["robust_accuracy"]

    gaussian = entries[Path("model_info/digits/Linf/gaussian.json")]
    assert gaussian["name"] == "Certified Adversarial Robustness via Randomized Smoothing"
    assert gaussian["authors"] == "Cohen, Rosenfeld & Kolter" and gaussian["venue"] == "ICML 2019"
    joint = entries[Path("model_info/digits/Linf/toy-joint.json")]
    assert joint["unreliable"] is True and "gradient masking" in joint["footnote"]
    assert joint["additional_data"] is None and joint["architecture"] == "unknown"  # not a registered model


def test_eps_strings_names_and_forward_passes():
    assert eps_string(8 / 255, "Linf") == "8/255"
    assert eps_string(0.1, "Linf") == "0.1"
    assert eps_string(0.5, "L2") == "0.5"
    assert eps_string(2.0, "L2") == "2"
    assert entry_name("cdn + denoise:0.25") == "cdn_denoise-0.25"
    assert entry_name("robustbench:Carmon2019Unlabeled") == "robustbench-Carmon2019Unlabeled"
    assert forward_passes("none") == 1
    assert forward_passes("denoise:0.25") == 2
    assert forward_passes("smooth:0.25:32") == 32


def test_write_robustbench_files(tmp_path):
    runs = load_runs([copy_run("gaussian-autoattack-L2", tmp_path / "runs")])
    (path,) = write_robustbench(runs, tmp_path / "out")
    assert path == tmp_path / "out" / "model_info" / "digits" / "L2" / "gaussian.json"
    entry = json.loads(path.read_text())
    assert entry["eps"] == "1" and entry["autoattack_acc"] == "30.00" and entry["clean_acc"] == "92.50"
    assert list(entry)[:3] == ["link", "name", "authors"]


# === RobustBench's rules (issue 28) =====================================================================
def _edited_run(tmp_path: Path, name: str, summary_edit=None, config_edit=None) -> Path:
    """The fixture run `standard-autoattack-Linf` with its summary and config.json edited in place."""
    target = copy_run("standard-autoattack-Linf", tmp_path / "runs", edit=summary_edit, new_name=name)
    if config_edit is not None:
        config = json.loads((target / "config.json").read_text())
        config_edit(config)
        (target / "config.json").write_text(json.dumps(config))
    return target


def _only_eps(eps: float):
    def edit(summary: dict) -> None:
        summary["curve"] = [dict(summary["curve"][0], eps=eps)]
    return edit


@pytest.mark.parametrize("eps", [8 / 255, 0.0313726, 0.031373])
def test_eps_within_1e_4_of_k_over_255_is_written_as_robustbench_writes_it(tmp_path: Path, eps: float) -> None:
    runs = load_runs([_edited_run(tmp_path, "aa", _only_eps(eps))])
    (entry,) = robustbench_entries(runs).values()
    assert entry["eps"] == "8/255"
    assert eps_string(0.0314 + 2e-4, "Linf") == "0.0316"  # 1.6e-4 from 8/255: the number as given
    assert eps_string(0.5, "L2") == "0.5"


def test_cli_eps_takes_fractions_and_the_export_writes_them_as_k_over_255(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from robusteval.cli import main

    result = CliRunner().invoke(main, ["run", "--model", "standard", "--attack", "fgsm", "--eps", "4/255,8/255",
                                       "--n", "4", "--no-large-eps-check", "--no-masking-checks", "--quiet",
                                       "--json", "--out", str(tmp_path / "fgsm")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "fgsm" / "config.json").read_text())["eps"] == [4 / 255, 8 / 255]
    bad = CliRunner().invoke(main, ["run", "--model", "standard", "--eps", "8/0", "--n", "2"])
    assert bad.exit_code == 2 and "--eps" in bad.output and "Traceback" not in bad.output


def test_a_steps_modified_autoattack_run_never_becomes_autoattack_acc(tmp_path: Path) -> None:
    def steps(config: dict) -> None:
        config["steps"] = 10
    runs = load_runs([_edited_run(tmp_path, "aa-steps", _only_eps(8 / 255), steps)])
    (entry,) = robustbench_entries(runs).values()
    assert "autoattack_acc" not in entry
    assert entry["nonstandard_autoattack_acc"] == "37.50"
    assert "--steps 10" in entry["nonstandard_reason"] and "--steps 10" in entry["footnote"]


def test_an_autoattack_rand_run_never_becomes_autoattack_acc_and_a_standard_run_beside_it_does(
        tmp_path: Path) -> None:
    def rand(summary: dict) -> None:
        _only_eps(8 / 255)(summary)
        summary.update(attack="autoattack-rand", eot=20)
        summary["curve"][0].update(robust_accuracy=0.1, standard_robust_accuracy=0.1, ci_low=0.05)
    rand_run = _edited_run(tmp_path, "aa-rand", rand)
    (entry,) = robustbench_entries(load_runs([rand_run])).values()
    assert "autoattack_acc" not in entry and entry["nonstandard_autoattack_acc"] == "10.00"
    assert "autoattack-rand is not the standard AutoAttack" in entry["nonstandard_reason"]
    # With the standard run beside it, autoattack_acc is the standard run's (37.50), never the lower rand one.
    standard = _edited_run(tmp_path, "aa", _only_eps(8 / 255))
    (entry,) = robustbench_entries(load_runs([rand_run, standard])).values()
    assert entry["autoattack_acc"] == "37.50" and "nonstandard_autoattack_acc" not in entry
    assert entry["external"] == "10.00"  # the best-known figure still counts every attack


def test_an_autoattack_run_on_a_randomized_pipeline_is_not_robustbench_s(tmp_path: Path) -> None:
    def noisy(summary: dict) -> None:
        _only_eps(8 / 255)(summary)
        summary["defense"] = "noise:0.25"
    (entry,) = robustbench_entries(load_runs([_edited_run(tmp_path, "aa-noise", noisy)])).values()
    assert "autoattack_acc" not in entry and "noise:0.25 is randomized" in entry["nonstandard_reason"]

    def detected(summary: dict) -> None:
        _only_eps(8 / 255)(summary)
        summary["checks"] = [{"check": "randomized-without-eot", "status": "flag", "message": "outputs change"}]
    (entry,) = robustbench_entries(load_runs([_edited_run(tmp_path, "aa-random", detected)])).values()
    assert "autoattack_acc" not in entry and "model is randomized" in entry["nonstandard_reason"]


def test_reported_is_the_card_s_claim_for_that_data_set_threat_model_and_eps(tmp_path: Path, monkeypatch) -> None:
    from robusteval.model_zoo import registry
    from robusteval.model_zoo.claims import Claim, PaperProtocol

    entry = registry.registered("standard")
    claim = Claim("digits", "Linf", 8 / 255, 0.4123, "Table 9", PaperProtocol("pgd", "standard.pt"))
    other = Claim("digits", "L2", 8 / 255, 0.9, "Table 9", PaperProtocol("pgd", "standard.pt"))
    card = dataclasses.replace(entry.card, claims=(other, claim))
    monkeypatch.setitem(registry._REGISTRY, "standard", dataclasses.replace(entry, card=card))
    (found,) = robustbench_entries(load_runs([_edited_run(tmp_path, "aa", _only_eps(0.031373))])).values()
    assert found["reported"] == "41.23"
    (none,) = robustbench_entries(load_runs([_edited_run(tmp_path, "aa4", _only_eps(4 / 255))])).values()
    assert none["reported"] == ""  # no claim at 4/255
