"""`robusteval benchmark --suite papers`: the papers' claims beside robusteval's measurements, end to end on a
synthetic checkpoint in the official format and a miniature CIFAR-10 folder (issue 28)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_official_checkpoints import cohen_cifar_file, make_cifar10

from robusteval.cli import main
from robusteval.model_zoo.claims import (
    COHEN_CLAIMS,
    NO_CLAIM_REASONS,
    Claim,
    PaperProtocol,
)
from robusteval.model_zoo.factory import list_models, model_card
from robusteval.papers import (
    find_checkpoint,
    markdown_cell,
    paper_claims,
    papers_markdown,
)


def test_cards_hold_the_papers_claims_as_data() -> None:
    claims = model_card("cohen").claims
    assert claims == COHEN_CLAIMS and model_card("cohen").as_dict()["claims"][0]["dataset"] == "cifar10"
    imagenet = [c for c in claims if c.dataset == "imagenet" and c.budget == 0.5]
    assert [(c.sigma, c.robust_accuracy) for c in imagenet] == [(0.25, 0.49)]  # the abstract's 49% at r = 0.5
    assert all(c.source.startswith("locuslab/smoothing README") for c in claims)
    assert all(c.protocol.checkpoint.endswith("checkpoint.pth.tar") for c in claims)
    # The other seed systems have no claim that could be confirmed: empty, never a guessed figure.
    assert {name for name, _ in paper_claims()} == {"cohen"}
    with pytest.raises(ValueError, match="certified claim needs its sigma"):
        Claim("cifar10", "L2-certified", 0.5, 0.4, "x", PaperProtocol("certify", "f"))


def test_every_seed_system_has_its_claims_or_the_reason_it_has_none_and_the_report_says_it() -> None:
    seeds = {name for name in list_models() if model_card(name).family == "joint"} | {"cohen"}
    claimed = {name for name, _ in paper_claims()}
    assert seeds == claimed | set(NO_CLAIM_REASONS) and not claimed & set(NO_CLAIM_REASONS)
    # DMAE's figures as the official README's Table 1/3 print them: best over σ, so no claim can carry its σ.
    dmae = NO_CLAIM_REASONS["dmae"]
    assert "Table 1" in dmae and "ViT-L 73.6/64.6/53.7/41.5/27.5%" in dmae
    assert "best over σ ∈ {0.25, 0.5, 1.0}" in dmae
    assert "ViT-B: 79.2/64.6/47.3/36.1% at r = 0.25/0.5/0.75/1.0" in dmae and "only the pre-trained" in dmae
    assert model_card("dmae").paper.startswith("Wu, Ye, Gu, Zhang, Wang & He 2023")  # the paper's authors
    report = papers_markdown([])
    assert "## Systems without a recorded claim" in report and "- dmae: quanlin-wu/dmae" in report
    assert all(f"- {name}: " in report for name in NO_CLAIM_REASONS)


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


def test_papers_suite_on_a_synthetic_cohen_checkpoint_lists_every_claim_and_the_missing_files(
        tmp_path: Path) -> None:
    model_dir = tmp_path / "released"
    released = model_dir / "models" / "cifar10" / "resnet110" / "noise_0.25" / "checkpoint.pth.tar"
    released.parent.mkdir(parents=True)
    cohen_cifar_file(released)  # the official format (depth read from the file: a ResNet-20 here)
    data = make_cifar10(tmp_path / "data", n=4)
    out = tmp_path / "runs"
    result = CliRunner().invoke(main, [
        "benchmark", "--suite", "papers", "--model-dir", str(model_dir), "--data-dir", str(data),
        "--out", str(out), "--device", "cpu", "--n-certify", "3", "--n0", "5", "--n", "20", "--n-attack", "2",
        "--votes", "2", "--eot", "1", "--steps", "2", "--no-large-eps-check"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "papers" / "papers.json").read_text())["rows"]
    # Every claim of every card is a row, in the card's order, with the claimed figure from the card.
    assert [(r["model"], r["claim"]["dataset"], r["claim"]["budget"], r["claim"]["sigma"]) for r in rows] == [
        ("cohen", c.dataset, c.budget, c.sigma) for c in COHEN_CLAIMS]
    assert [r["claimed"] for r in rows] == [c.robust_accuracy for c in COHEN_CLAIMS]
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
    missing = [r for r in rows if r["status"] == "missing"]
    assert len(missing) == len(COHEN_CLAIMS) - 2
    assert all(r["paper_protocol"] is None and r["gap"] is None for r in missing)
    assert str(model_dir / "models/imagenet/resnet50/noise_1.00/checkpoint.pth.tar") in result.stdout
    assert "2 claims measured, 5 without their checkpoint, 0 failed" in result.stdout
    markdown = (out / "papers" / "papers.md").read_text()
    assert "| cohen | cifar10 certified L2 r=0.25 (σ=0.25) |" in markdown and "missing: " in markdown


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
