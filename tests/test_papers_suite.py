"""`robusteval benchmark --suite papers`: the papers' claims beside robusteval's measurements, end to end on a
synthetic checkpoint in the official format and a miniature CIFAR-10 folder (issue 28)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_official_checkpoints import cohen_cifar_file, make_cifar10

from robusteval.cli import main
from robusteval.core.errors import UsageError
from robusteval.model_zoo.claims import (
    COHEN_CLAIMS,
    DMAE_CLAIMS,
    DMAE_SIGMAS,
    NO_CLAIM_REASONS,
    Claim,
    PaperProtocol,
)
from robusteval.model_zoo.factory import list_models, model_card
from robusteval.papers import (
    best_of,
    find_checkpoint,
    interval,
    markdown_cell,
    paper_claims,
    papers_markdown,
)
from robusteval.reports.loading import load_runs


def test_cards_hold_the_papers_claims_as_data() -> None:
    claims = model_card("cohen").claims
    assert claims == COHEN_CLAIMS and model_card("cohen").as_dict()["claims"][0]["dataset"] == "cifar10"
    imagenet = [c for c in claims if c.dataset == "imagenet" and c.budget == 0.5]
    assert [(c.sigma, c.robust_accuracy) for c in imagenet] == [(0.25, 0.49)]  # the abstract's 49% at r = 0.5
    assert all(c.source.startswith("locuslab/smoothing README") for c in claims)
    assert all(c.protocol.checkpoint.endswith("checkpoint.pth.tar") for c in claims)
    # experiments.MD: certify.py --skip 20 on CIFAR-10, --skip 100 on ImageNet, 500 images each.
    assert {(c.dataset, c.protocol.n_images, c.protocol.skip) for c in claims} == {("cifar10", 500, 20),
                                                                                ("imagenet", 500, 100)}
    assert imagenet[0].notes == ("the repository's raw CERTIFY output data/certify/imagenet/resnet50/noise_0.25/test/"
                                 "sigma_0.25 gives 49.4% over the 427 images it holds (211 of 427)",)
    # The other seed systems have no claim that could be confirmed: empty, never a guessed figure.
    assert {name for name, _ in paper_claims()} == {"cohen", "dmae"}
    with pytest.raises(ValueError, match="certified claim needs its sigma"):
        Claim("cifar10", "L2-certified", 0.5, 0.4, "x", PaperProtocol("certify", "f"))


def test_dmae_claims_are_the_tables_best_over_sigma_each_sigma_its_own_fine_tuned_file() -> None:
    claims = model_card("dmae").claims
    assert claims == DMAE_CLAIMS and all(claim.sigmas == DMAE_SIGMAS == (0.25, 0.5, 1.0) for claim in claims)
    variants = list(dict.fromkeys((c.dataset, c.variant) for c in claims))
    assert variants == [("cifar10", "ViT-B"), ("imagenet", "ViT-B"), ("imagenet", "ViT-L")]
    cifar = [c for c in claims if c.dataset == "cifar10"]
    assert [(c.budget, c.robust_accuracy) for c in cifar] == [(0.25, 0.792), (0.5, 0.646), (0.75, 0.473),
                                                              (1.0, 0.361)]
    large = [c for c in claims if c.variant == "ViT-L"]
    assert [c.robust_accuracy for c in large] == [0.736, 0.646, 0.537, 0.415, 0.275]
    # The official evaluations: the whole CIFAR-10 test set at n = 100,000; every 50th ImageNet image at 10,000.
    assert {(c.protocol.n_images, c.protocol.skip, c.protocol.n, c.protocol.n0, c.protocol.alpha) for c in cifar} == {
        (10_000, 1, 100_000, 100, 0.001)}
    assert {(c.protocol.n_images, c.protocol.skip, c.protocol.n) for c in large} == {(1_000, 50, 10_000)}
    assert cifar[0].protocol.checkpoint_for(0.5) == "dmae/cifar10/vit_base_patch16/sigma_0.50/checkpoint-*.pth"
    assert large[0].protocol.checkpoint_for(1.0) == "dmae/imagenet/vit_large_patch16/sigma_1.00/checkpoint-*.pth"
    assert cifar[1].label == "cifar10 ViT-B certified L2 r=0.5 (best of σ ∈ {0.25, 0.5, 1})"
    assert cifar[1].noise_levels == (0.25, 0.5, 1.0) and COHEN_CLAIMS[0].noise_levels == (0.25,)
    assert cifar[0].source.startswith("quanlin-wu/dmae README, the paper's Table 3 (CIFAR-10)")
    protocol = PaperProtocol("certify", "a/sigma_{sigma}/f.pth")
    with pytest.raises(ValueError, match="one sigma or a set"):
        Claim("cifar10", "L2-certified", 0.5, 0.4, "x", protocol, sigma=0.25, sigmas=(0.25, 0.5))
    with pytest.raises(ValueError, match="two or more increasing"):
        Claim("cifar10", "L2-certified", 0.5, 0.4, "x", protocol, sigmas=(0.5, 0.25))
    with pytest.raises(ValueError, match="holds {sigma}"):
        Claim("cifar10", "L2-certified", 0.5, 0.4, "x", PaperProtocol("certify", "f.pth"), sigmas=(0.25, 0.5))


def test_the_best_of_several_sigmas_gets_a_simultaneous_interval_that_covers_the_best_true_accuracy() -> None:
    # Known answer: Bonferroni over m = 3, each a Clopper–Pearson interval at 1 - 0.05/3, the best's bounds the
    # largest of them.
    counts = {0.25: 30, 0.5: 34, 1.0: 12}
    best = best_of(counts, 50)
    each = [interval(count, 50, alpha=0.05 / 3) for count in counts.values()]
    assert (best["value"], best["count"], best["n"]) == (34 / 50, 34, 50)
    assert best["ci_low"] == max(i["ci_low"] for i in each) and best["ci_high"] == max(i["ci_high"] for i in each)
    assert best["ci_low"] < interval(34, 50)["ci_low"]  # wider than a 95% interval around the best count alone
    # Coverage of the largest true proportion where selection bias is worst (equal proportions): at least 95%
    # for the simultaneous interval, clearly below it for the naive interval around the best count.
    rng = np.random.default_rng(0)
    truth, total, trials = 0.6, 200, 2000
    draws = rng.binomial(total, truth, size=(trials, 3))
    covered = naive = 0
    for row in draws:
        simultaneous = best_of(dict(zip(DMAE_SIGMAS, row.tolist(), strict=True)), total)
        covered += simultaneous["ci_low"] <= truth <= simultaneous["ci_high"]
        alone = interval(int(row.max()), total)
        naive += alone["ci_low"] <= truth <= alone["ci_high"]
    assert covered / trials >= 0.95 and naive / trials < 0.94


def test_every_seed_system_has_its_claims_or_the_reason_it_has_none_and_the_report_says_it() -> None:
    seeds = {name for name in list_models() if model_card(name).family == "joint"} | {"cohen"}
    claimed = {name for name, _ in paper_claims()}
    assert seeds == claimed | set(NO_CLAIM_REASONS) and not claimed & set(NO_CLAIM_REASONS)
    assert model_card("dmae").paper.startswith("Wu, Ye, Gu, Zhang, Wang & He 2023")  # the paper's authors
    report = papers_markdown([])
    assert "## Systems without a recorded claim" in report and "- jem: wgrathwohl/JEM" in report
    assert all(f"- {name}: " in report for name in NO_CLAIM_REASONS)


def test_a_starred_file_name_takes_the_last_epoch_the_training_wrote(tmp_path: Path) -> None:
    folder = tmp_path / "dmae" / "sigma_0.25"
    assert find_checkpoint(tmp_path, "dmae/sigma_0.25/checkpoint-*.pth") is None  # no folder yet
    folder.mkdir(parents=True)
    for epoch in (9, 49, 100, 7):
        (folder / f"checkpoint-{epoch}.pth").write_bytes(b"x")
    (folder / "checkpoint-200.pth").mkdir()  # DeepSpeed writes folders of that name: not a file
    assert find_checkpoint(tmp_path, "dmae/sigma_0.25/checkpoint-*.pth") == folder / "checkpoint-100.pth"


def test_a_claim_matches_its_budget_to_1e_4_and_its_checkpoint_with_or_without_models(tmp_path: Path) -> None:
    claim = Claim("cifar10", "Linf", 8 / 255, 0.5, "Table 1", PaperProtocol("pgd", "models/a/b.pt"))
    assert claim.matches(dataset="cifar10", threat_model="Linf", budget=0.031373)
    assert not claim.matches(dataset="cifar10", threat_model="Linf", budget=0.0316)
    assert not claim.matches(dataset="cifar10", threat_model="Linf", budget=8 / 255, defense="noise:0.25")
    assert find_checkpoint(tmp_path, "models/a/b.pt") is None
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b.pt").write_bytes(b"x")
    assert find_checkpoint(tmp_path, "models/a/b.pt") == tmp_path / "a" / "b.pt"
    assert markdown_cell("a|b<script>\nc") == "a\\|b&lt;script&gt; c"


def small_papers_suite(model_dir: Path, data: Path, out: Path, *, n_certify: int, draws: int):
    """`robusteval benchmark --suite papers` shrunk for a test: n_certify images, n0 = 5, n = draws, 2 attack
    points on smooth:σ:2 with one EOT draw and two steps; it must exit 0."""
    result = CliRunner().invoke(main, [
        "benchmark", "--suite", "papers", "--model-dir", str(model_dir), "--data-dir", str(data),
        "--out", str(out), "--device", "cpu", "--n-certify", str(n_certify), "--n0", "5", "--n", str(draws),
        "--n-attack", "2", "--votes", "2", "--eot", "1", "--steps", "2", "--no-large-eps-check"])
    assert result.exit_code == 0, result.output
    return result


def test_papers_suite_on_a_synthetic_cohen_checkpoint_lists_every_claim_and_the_missing_files(
        tmp_path: Path) -> None:
    model_dir = tmp_path / "released"
    released = model_dir / "models" / "cifar10" / "resnet110" / "noise_0.25" / "checkpoint.pth.tar"
    released.parent.mkdir(parents=True)
    cohen_cifar_file(released)  # the official format (depth read from the file: a ResNet-20 here)
    data = make_cifar10(tmp_path / "data", n=41)  # every 20th, as Cohen et al. certify: images 0, 20 and 40
    out = tmp_path / "runs"
    result = small_papers_suite(model_dir, data, out, n_certify=3, draws=20)
    rows = json.loads((out / "papers" / "papers.json").read_text())["rows"]
    # Every claim of every card is a row, in the card's order, with the claimed figure from the card.
    assert [(r["model"], r["claim"]["dataset"], r["claim"]["budget"], r["claim"]["sigma"]) for r in rows] == [
        (name, c.dataset, c.budget, c.sigma) for name, c in paper_claims()]
    assert [r["claimed"] for r in rows] == [c.robust_accuracy for _, c in paper_claims()]
    measured = [r for r in rows if r["status"] == "measured"]
    assert [(r["claim"]["sigma"], r["claim"]["budget"]) for r in measured] == [(0.25, 0.25), (0.25, 0.5)]
    for row in measured:
        assert row["checkpoint"] == str(released)
        for key in ("paper_protocol", "autoattack", "adaptive"):
            figure = row[key]
            assert figure["ci_low"] <= figure["value"] <= figure["ci_high"]
            assert figure["n"] == (3 if key == "paper_protocol" else 2)
        # The gap is the claim minus the certified accuracy measured, its interval the measurement's mirrored.
        paper, gap = row["paper_protocol"], row["gap"]
        assert gap["value"] == pytest.approx(row["claimed"] - paper["value"])
        assert (gap["ci_low"], gap["ci_high"]) == pytest.approx((row["claimed"] - paper["ci_high"],
                                                                 row["claimed"] - paper["ci_low"]))
        # A certificate cannot exceed what an attack leaves standing on the same images' smoothed classifier
        # (here only a sanity check of the wiring: certify and attack see different numbers of images).
        assert any("autoattack-rand on smooth:0.25:2" in note for note in row["notes"])
    # Both claims at σ = 0.25 share one certify run (the certificate is read at each radius).
    assert measured[0]["runs"][0] == measured[1]["runs"][0]
    assert json.loads((Path(measured[0]["runs"][0]) / "config.json").read_text())["every"] == 20
    missing = [r for r in rows if r["status"] == "missing"]
    assert len(missing) == len(COHEN_CLAIMS) + len(DMAE_CLAIMS) - 2
    assert all(r["paper_protocol"] is None and r["gap"] is None for r in missing)
    assert str(model_dir / "models/imagenet/resnet50/noise_1.00/checkpoint.pth.tar") in result.stdout
    assert f"2 claims measured, {len(missing)} without their checkpoint, 0 failed" in result.stdout
    markdown = (out / "papers" / "papers.md").read_text()
    assert "| cohen | cifar10 certified L2 r=0.25 (σ=0.25) |" in markdown and "missing: " in markdown
    assert "- cohen, cifar10 certified L2 r=0.5 (σ=0.25): the repository's raw CERTIFY output" in markdown


def test_papers_suite_needs_a_model_dir(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["benchmark", "--suite", "papers", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--suite papers needs --model-dir" in result.output
    other = CliRunner().invoke(main, ["benchmark", "--suite", "digits-ci", "--votes", "3", "--out", str(tmp_path)])
    assert other.exit_code == 2 and "apply to --suite papers" in other.output


def test_an_empirical_claim_is_measured_with_the_papers_attack_autoattack_and_the_adaptive_worst_case(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_official_checkpoints import jem_file

    import robusteval.papers as papers

    (tmp_path / "released").mkdir()
    jem_file(tmp_path / "released" / "CIFAR10_MODEL.pt")
    data = make_cifar10(tmp_path / "data", n=4)
    claim = Claim("cifar10", "Linf", 8 / 255, 0.9, "a test's claim", PaperProtocol("fgsm", "CIFAR10_MODEL.pt"))
    monkeypatch.setattr(papers, "paper_claims", lambda: [("jem", claim)])
    suite = papers.PapersSuite(attack_points=3, steps=2, large_eps_check=False, masking_checks=False)
    (row,), folder = papers.run_papers(tmp_path / "released", tmp_path / "runs", suite, data_dir=data, device="cpu")
    assert row.status == "measured", row.status
    assert row.paper["n"] == row.autoattack["n"] == row.adaptive["n"] == 3
    # The adaptive figure is the worst case over everything run, so never above AutoAttack's own.
    assert row.adaptive["value"] <= row.autoattack["value"]
    assert row.gap["value"] == pytest.approx(0.9 - row.adaptive["value"])
    fgsm, autoattack = (json.loads((Path(run) / "config.json").read_text()) for run in row.runs)
    assert (fgsm["attack"], fgsm["eps"], autoattack["attack"], autoattack["steps"]) == (
        "fgsm", [8 / 255], "autoattack", 2)
    assert "| jem | cifar10 Linf ε=0.03137 |" in (folder / "papers.md").read_text()


def test_papers_suite_certifies_each_sigmas_fine_tune_and_compares_the_best_with_dmaes_table(tmp_path: Path) -> None:
    """DMAE's CIFAR-10 claims on three synthetic fine-tunes (one folder per σ, as finetune_cifar10.py's
    --output_dir), each holding an older, broken epoch beside the last one, which must be the file used."""
    import pickle

    import torch
    from test_official_checkpoints import dmae_file

    import robusteval
    from robusteval.data import load_dataset

    model_dir = tmp_path / "released"
    files = {}
    for sigma in DMAE_SIGMAS:
        folder = model_dir / "dmae" / "cifar10" / "vit_base_patch16" / f"sigma_{sigma:.2f}"
        folder.mkdir(parents=True)
        (folder / "checkpoint-3.pth").write_bytes(b"an older epoch, broken on purpose")
        files[sigma] = folder / "checkpoint-12.pth"
        dmae_file(files[sigma])
    # Labels the synthetic ViT gets right on the clean images, so that certified accuracies are not all zero.
    data = make_cifar10(tmp_path / "data", n=6)
    model = robusteval.create_model("dmae", dataset="cifar10", checkpoint=files[0.25])
    with torch.no_grad():
        predicted = model(load_dataset("cifar10", root=data).x).argmax(1)
    test_batch = data / "cifar-10-batches-py" / "test_batch"
    batch = pickle.loads(test_batch.read_bytes())
    test_batch.write_bytes(pickle.dumps({**batch, "labels": predicted.tolist()}, protocol=2))
    out = tmp_path / "runs"
    small_papers_suite(model_dir, data, out, n_certify=6, draws=100)
    rows = [r for r in json.loads((out / "papers" / "papers.json").read_text())["rows"] if r["model"] == "dmae"]
    measured = [r for r in rows if r["status"] == "measured"]
    assert [r["claim"]["budget"] for r in measured] == [0.25, 0.5, 0.75, 1.0]
    certified_runs = measured[0]["runs"][:3]
    runs = load_runs(certified_runs)
    assert [json.loads((Path(run) / "config.json").read_text())["sigma"] for run in certified_runs] == [
        0.25, 0.5, 1.0]
    for row in measured:
        assert row["checkpoint"] == ", ".join(str(files[sigma]) for sigma in DMAE_SIGMAS)
        assert row["runs"][:3] == certified_runs  # every radius reads the same three certify runs
        per_sigma = {sigma: round(run.certified_accuracy_at(row["claim"]["budget"]) * 6)
                     for sigma, run in zip(DMAE_SIGMAS, runs, strict=True)}
        assert row["paper_protocol"] == best_of(per_sigma, 6)
        assert row["gap"]["value"] == pytest.approx(row["claimed"] - max(per_sigma.values()) / 6)
        assert any(note.startswith("certified per σ: σ=0.25 ") and "Bonferroni" in note for note in row["notes"])
        chosen = max(per_sigma, key=lambda sigma: (per_sigma[sigma], -sigma))
        assert any(f"autoattack-rand on smooth:{chosen:g}:2" in note for note in row["notes"])
        assert row["autoattack"]["n"] == row["adaptive"]["n"] == 2
    assert max(r["paper_protocol"]["value"] for r in measured) > 0  # the comparison is not of zeros
    missing = [r for r in rows if r["status"] == "missing"]
    assert len(missing) == 10 and all(r["claim"]["dataset"] == "imagenet" for r in missing)
    assert missing[0]["checkpoint"] == ", ".join(
        str(model_dir / f"dmae/imagenet/vit_base_patch16/sigma_{sigma:.2f}/checkpoint-*.pth") for sigma in DMAE_SIGMAS)
    markdown = (out / "papers" / "papers.md").read_text()
    assert "| dmae | cifar10 ViT-B certified L2 r=0.25 (best of σ ∈ {0.25, 0.5, 1}) |" in markdown


def test_a_claim_measured_on_every_kth_image_is_measured_on_those_images(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Cohen et al.'s ImageNet protocol (every 100th image, certify.py --skip) and DMAE's (every 50th) on
    CIFAR-10 in miniature: every 2nd of six images, two of them."""
    import robusteval.papers as papers
    from robusteval.data import load_dataset

    released = tmp_path / "released" / "noise_0.25" / "checkpoint.pth.tar"
    released.parent.mkdir(parents=True)
    cohen_cifar_file(released)
    data = make_cifar10(tmp_path / "data", n=6)
    protocol = PaperProtocol("certify", "noise_0.25/checkpoint.pth.tar", n_images=2, skip=2, n0=5, n=20,
                             alpha=0.001)
    claim = Claim("cifar10", "L2-certified", 0.25, 0.6, "a test's claim", protocol, sigma=0.25)
    monkeypatch.setattr(papers, "paper_claims", lambda: [("cohen", claim)])
    suite = papers.PapersSuite(attack_points=2, votes=2, eot=1, steps=2, large_eps_check=False,
                               masking_checks=False)
    (row,), _ = papers.run_papers(tmp_path / "released", tmp_path / "runs", suite, data_dir=data, device="cpu")
    assert row.status == "measured", row.status
    labels = load_dataset("cifar10", root=data).y[0:4:2].tolist()
    certified, attacked = (Path(run) for run in row.runs)
    for run, records in ((certified, "samples.jsonl"), (attacked, "samples.jsonl")):
        assert json.loads((run / "config.json").read_text())["every"] == 2
        assert [json.loads(line)["label"] for line in (run / records).read_text().splitlines()] == labels
    assert "every 2nd test image in the sorted order, as the paper's script" in row.notes
    assert [papers.ordinal(k) for k in (1, 2, 3, 11, 12, 50, 100, 101, 112)] == [
        "1st", "2nd", "3rd", "11th", "12th", "50th", "100th", "101st", "112th"]
    with pytest.raises(UsageError, match="do not pass --every"):
        papers.run_papers(tmp_path / "released", tmp_path / "runs", suite, data_dir=data, every=3)


def test_dmae_and_cohen_evaluate_imagenet_with_their_own_scriptspreprocessing_for() -> None:
    from robusteval.jobs import JobOptions, preprocessing_for

    # DMAE's util/datasets.py: bicubic resize to 256, centre crop 224; Cohen et al.'s: torchvision's default.
    assert preprocessing_for("dmae", JobOptions(dataset="imagenet")) == "BicubicRes256Crop224"
    assert preprocessing_for("cohen", JobOptions(dataset="imagenet")) == "Res256Crop224"
    assert preprocessing_for("dmae", JobOptions(dataset="imagenet", preprocessing="res256crop224")) == "Res256Crop224"
