"""`robusteval benchmark`: the grid each suite plans, and a small grid run end to end through the real engines."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from click.testing import CliRunner

from robusteval.benchmark import SUITES, describe_suite, plan, run_benchmark
from robusteval.cli import main
from robusteval.model_zoo.factory import list_models, model_card
from robusteval.reports.loading import load_runs


def _jobs(suite, models, tmp_path):
    return {job.label: job for job in plan(suite, models, tmp_path)}


def test_digits_grid_for_baselines(tmp_path):
    jobs = _jobs(SUITES["digits"], ["standard", "gaussian-s0.5", "dncnn+standard"], tmp_path)
    assert set(jobs) == {
        "attack-standard-Linf-autoattack", "attack-standard-L2-autoattack",
        "certify-standard-direct-s0.12", "certify-standard-direct-s0.25", "certify-standard-direct-s0.5",
        "attack-gaussian-s0.5-Linf-autoattack", "attack-gaussian-s0.5-L2-autoattack",
        "certify-gaussian-s0.5-direct-s0.5",  # a baseline trained at one σ is certified at that σ
        "attack-dncnn+standard-Linf-autoattack", "attack-dncnn+standard-L2-autoattack",
        *(f"certify-dncnn+standard-{mode}-s{s}" for mode in ("direct", "denoised") for s in ("0.12", "0.25", "0.5")),
        "denoise-dncnn+standard",  # a model with a denoiser gets a PSNR run
    }
    attack = jobs["attack-standard-Linf-autoattack"].arguments
    assert attack["n"] == SUITES["digits"].n_attack and attack["eps"] is None  # the engine's full ε grid
    certify = jobs["certify-dncnn+standard-denoised-s0.25"].arguments
    assert (certify["n0"], certify["n"], certify["alpha"]) == (100, 2_000, 0.001)
    ci = _jobs(SUITES["digits-ci"], ["standard"], tmp_path)
    assert set(ci) == {"attack-standard-Linf-autoattack", "attack-standard-L2-autoattack",
                       "certify-standard-direct-s0.25"}
    assert ci["attack-standard-Linf-autoattack"].arguments["eps"] == (0.1,)


def test_joint_models_get_adaptive_attacks_on_their_pipelines(tmp_path):
    joint = [m for m in list_models() if model_card(m).family == "joint" and "denoise" in model_card(m).capabilities]
    assert joint, "the zoo ships joint models with a denoiser (cdn, egc, dmae, jdm)"
    model = joint[0]
    jobs = _jobs(SUITES["digits"], [model], tmp_path)
    denoise = jobs[f"attack-{model}-Linf-autoattack-denoise0.25"].arguments
    assert (denoise["defense"], denoise["gradient"]) == ("denoise:0.25", "auto")
    noise = jobs[f"attack-{model}-Linf-autoattack-rand-noise0.25"].arguments
    assert (noise["attack"], noise["defense"]) == ("autoattack-rand", "noise:0.25")
    assert denoise["eps"] == noise["eps"] == [0.1]  # adaptive attacks at the headline ε only
    assert f"attack-{model}-L2-autoattack-rand-noise0.25" not in jobs
    assert f"certify-{model}-denoised-s0.5" in jobs
    ci = _jobs(SUITES["digits-ci"], [model], tmp_path)
    assert sorted(label for label in ci if label.startswith("attack-")) == [
        f"attack-{model}-L2-autoattack", f"attack-{model}-Linf-autoattack"]  # no adaptive attacks in CI


def test_sgld_trained_models_get_jems_sgld_purification(tmp_path):
    jobs = _jobs(SUITES["digits"], ["jem", "gmmc", "cdn"], tmp_path)
    k = SUITES["digits"].sgld_steps
    # Each model refines with its own training chains' step and noise: JEM's are the official refinement's.
    for model, defense in (("jem", f"sgld:{k}"), ("gmmc", f"sgld:{k}:0.01:0.005:5")):
        sgld = jobs[f"attack-{model}-Linf-autoattack-rand-sgld{k}"].arguments
        assert (sgld["attack"], sgld["defense"], sgld["gradient"]) == ("autoattack-rand", defense, "auto")
        assert sgld["eps"] == [0.1] and sgld["n"] == SUITES["digits"].n_defense
    assert not any("sgld" in label for label in jobs if "cdn" in label)  # cdn is not trained with SGLD
    assert not any("sgld" in label for label in _jobs(SUITES["digits-ci"], ["jem"], tmp_path))


def test_the_diffusion_style_joint_models_get_multi_step_purification(tmp_path):
    suite = SUITES["digits"]
    jobs = _jobs(suite, ["jdm", "egc", "cdn", "dmae", "jem"], tmp_path)
    k, s = suite.purify_steps, f"{suite.defense_sigma:g}"
    assert k >= 2  # a multi-step process, not today's one-shot denoise:S
    for model in ("jdm", "egc", "cdn"):
        purify = jobs[f"attack-{model}-Linf-autoattack-rand-purify{s}-{k}"]
        assert (purify.arguments["attack"], purify.arguments["defense"], purify.arguments["gradient"]) == (
            "autoattack-rand", f"purify:{s}:{k}", "auto")
        assert purify.arguments["n"] == suite.n_purify and purify.arguments["eps"] == [0.1]
    assert not any("purify" in label for label in jobs if "dmae" in label or "jem" in label)
    # The costliest runs start first, so the grid's wall time is not one slow run at the end.
    costliest = max(jobs.values(), key=lambda job: job.cost)
    assert "purify" in costliest.label
    assert f"purify:{s}:{k}" in describe_suite(suite)
    assert not any("purify" in label for label in _jobs(SUITES["digits-ci"], ["jdm"], tmp_path))


def test_a_small_grid_runs_end_to_end_and_resumes(tmp_path):
    suite = dataclasses.replace(SUITES["digits-ci"], name="tiny", eps={}, n_certify=4, n0=20, n=100,
                                denoise_images=8)
    events = []
    forwards = []
    hook = torch.nn.modules.module.register_module_forward_hook(lambda module, args, output: forwards.append(1))
    try:
        result = run_benchmark(suite, tmp_path, models=("standard", "dncnn*"), device="cpu", on_event=events.append)
    finally:
        hook.remove()
    assert forwards  # the hook sees the evaluations' forward passes
    assert not result.failed
    runs = load_runs(result.finished)
    assert sorted((r.kind, r.model) for r in runs) == [
        ("certify", "dncnn+standard"), ("certify", "dncnn+standard"), ("certify", "standard"),
        ("denoise", "dncnn+standard")]
    assert all(r.summary.get("n_images") in (4, 8) for r in runs)
    record = json.loads((tmp_path / "tiny" / "benchmark.json").read_text())
    assert record["suite"]["n"] == 100 and set(record["runs"]) == {p.name for p in result.finished}
    before = {p.name: json.loads((p / "summary.json").read_text()) for p in result.finished}
    # Finished runs are read back, not recomputed: no module runs a forward pass in the second call.
    forwards.clear()
    hook = torch.nn.modules.module.register_module_forward_hook(lambda module, args, output: forwards.append(1))
    try:
        again = run_benchmark(suite, tmp_path, models=("standard", "dncnn*"), device="cpu")
    finally:
        hook.remove()
    assert forwards == []
    after = {p.name: json.loads((p / "summary.json").read_text()) for p in again.finished}
    assert after.keys() == before.keys()
    for name, summary in after.items():  # finished runs are resumed, not recomputed: the same figures
        key = "certified_accuracy" if summary["kind"] == "certify" else "psnr"
        assert summary[key] == before[name][key]


def test_the_command_runs_a_grid_and_writes_its_report(tmp_path):
    # Through the command line, report step included (a name clash once crashed it after every finished grid).
    report = tmp_path / "board.html"
    result = CliRunner().invoke(main, [
        "benchmark", "--suite", "digits-ci", "--models", "standard", "--out", str(tmp_path / "runs"), "--report",
        str(report), "--n-attack", "2", "--n-certify", "2", "--n0", "10", "--draws", "40", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert report.is_file() and f"wrote {report}" in result.output
    assert "--n-attack 2 --n-certify 2 --n0 10 --n 40" in report.read_text()  # the command that made it


def test_unknown_suite_is_a_clear_error():
    result = CliRunner().invoke(main, ["benchmark", "--suite", "digit"])
    assert result.exit_code == 2 and "unknown suite 'digit'" in result.output and "digits" in result.output


def test_the_report_states_the_grid_sizes():
    text = describe_suite(SUITES["digits"], run_seconds=1800)
    suite = SUITES["digits"]
    for fact in (f"AutoAttack on {suite.n_attack} points", f"on {suite.n_defense} points",
                 f"Certification of {suite.n_certify} images", f"n0 = {suite.n0}", f"n = {suite.n:,}",
                 "L∞ ε ∈ {0.05, 0.1, 0.15, 0.2, 0.3}", "30 min of single-threaded compute"):
        assert fact in text
    # α^(1/n) is the Clopper-Pearson bound when every draw is correct: Φ⁻¹(0.001^(1/2000)) = 2.70.
    assert "largest certifiable radius is 2.70σ" in text
    assert "Adaptive" not in describe_suite(SUITES["digits-ci"])  # the CI grid runs no adaptive attacks


def test_committed_baseline_covers_exactly_the_digits_ci_plan(tmp_path):
    # The CI gate compares a fresh digits-ci grid with reports/baseline.json: an entry missing from the baseline
    # is never gated, and a stale one fails CI. The keys are rebuilt here from the suite's own parameters.
    suite = SUITES["digits-ci"]
    baseline = json.loads((Path(__file__).parents[1] / "reports" / "baseline.json").read_text())["entries"]
    jobs = plan(suite, [m for m in list_models() if suite.dataset in model_card(m).checkpoints()], tmp_path)
    expected = {}
    for job in jobs:
        arguments = job.arguments
        if job.kind == "attack":
            key = f"attack/{suite.dataset}/{job.model}/{arguments['norm']}/{arguments['attack']}/{arguments['defense']}"
            expected[key] = {"n": suite.n_attack, "eps": list(arguments["eps"])}
        elif job.kind == "certify":
            key = f"certify/{suite.dataset}/{job.model}/{arguments['mode']}/sigma={arguments['sigma']:g}"
            expected[key] = {"n_images": suite.n_certify, "n0": suite.n0, "n": suite.n, "alpha": suite.alpha}
    assert sorted(baseline) == sorted(expected)
    for key, config in expected.items():
        recorded = baseline[key]["config"]
        assert {k: recorded[k] for k in config} == config, key
        total = config.get("n", config.get("n_images")) if key.startswith("attack") else config["n_images"]
        assert all(f["total"] == total for f in baseline[key]["figures"].values()), key
