"""Plant known defects in a scratch copy of the project and check that the test suite catches each one.

    python tests/mutations/plant_defects.py            # every defect
    python tests/mutations/plant_defects.py auroc-one  # some of them, by name
    python tests/mutations/plant_defects.py --list

For each defect: copy the working tree (tracked and untracked, not ignored
files) to a temporary folder, replace one exact piece of source text there,
run the tests that claim the property, and expect them to FAIL. A defect the
tests let pass ("SURVIVED") or a patch whose anchor text is no longer in the
source ("STALE": update the anchor after a refactor) makes the script exit 1.
The report lists, per defect, the tests that went red.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Defect:
    name: str
    what: str
    path: str  # file in the project
    old: str  # exact text, present once
    new: str
    tests: tuple[str, ...]  # pytest node ids / files, with optional -k via "path::name"


DEFECTS = (
    Defect(
        "one-draw-decision", "a randomized pipeline decides from a single noise draw",
        "robusteval/attacks/defenses.py",
        "for votes in self._draw_votes(x, max(self.decision_draws, self.defense.votes)):",
        "for votes in self._draw_votes(x, 1):",
        ("tests/test_attacks_engine.py::test_randomized_decision_is_the_majority_of_fresh_draws",
         "tests/test_attacks_known_answer.py::"
         "test_noise_and_denoise_defense_has_the_deterministic_purification_answer"),
    ),
    Defect(
        "noiseless-decision", "a randomized pipeline decides without any noise",
        "robusteval/attacks/defenses.py",
        "noisy predictions.\n        \"\"\"\n        if not self.randomized:\n            logits = self._draw(x)",
        "noisy predictions.\n        \"\"\"\n        if True:\n            logits = self.model.logits(x, 0.0)",
        ("tests/test_attacks_engine.py::test_randomized_decision_is_the_majority_of_fresh_draws",),
    ),
    Defect(
        "auroc-one", "AUROC always returns 1", "robusteval/generative/quality.py",
        "    pos = positive_scores.flatten().double().view(-1, 1)", "    return 1.0\n    pos = None",
        ("tests/test_quality.py",),
    ),
    Defect(
        "identity-blur", "the Gaussian blur returns its input", "robusteval/generative/quality.py",
        "    if width <= 0:\n        return x.clone()", "    if True:\n        return x.clone()",
        ("tests/test_quality.py",),
    ),
    Defect(
        "shuffle-identity", "pixel shuffling keeps every pixel in place", "robusteval/generative/quality.py",
        "    order = torch.argsort(torch.rand(flat.shape, generator=generator), dim=1)",
        "    order = torch.arange(flat.shape[1]).expand(flat.shape[0], -1)",
        ("tests/test_quality.py",),
    ),
    Defect(
        "resume-recomputes", "a run directory is never resumed: every run starts afresh", "robusteval/runs/directory.py",
        "if config_path.exists() and resume:", "if False:",
        ("tests/test_attacks_cli.py::test_run_killed_with_sigkill_resumes_to_the_uninterrupted_summary",
         "tests/test_attacks_engine.py::test_run_directory_holds_config_records_summary_and_resumes_a_finished_run",
         "tests/test_reports_denoising.py::test_run_directory_resumes_to_the_same_summary_and_loads_as_a_denoise_run",
         "tests/test_reports_benchmark.py::test_a_small_grid_runs_end_to_end_and_resumes",
         "tests/test_certify_engine.py::test_resume_after_a_kill_continues_from_the_last_complete_batch"),
    ),
    Defect(
        "partial-batch-recomputed", "a batch killed between two ε restarts from its first ε",
        "robusteval/attacks/resume.py",
        '        """A batch\'s saved state, or None (start the batch afresh) when there is none or it does not fit."""\n',
        '        """A batch\'s saved state, or None (start the batch afresh) when there is none or it does not fit."""\n'
        "        return None\n",
        ("tests/test_attacks_engine.py::test_a_batch_killed_between_eps_resumes_from_its_last_finished_eps",),
    ),
    Defect(
        "interval-0-1", "the attack's confidence interval is [0, 1]", "robusteval/attacks/results.py",
        'low, high = proportion_confint(robust, n, alpha=0.05, method="beta")', "low, high = 0.0, 1.0",
        ("tests/test_attacks_engine.py::test_curve_is_monotone_and_every_adversarial_example_checks_out",
         "tests/test_attacks_cli.py::test_run_egc_autoattack_writes_a_valid_run_directory"),
    ),
    Defect(
        "denoiser-skipped", "the denoise defense classifies the input without denoising it",
        "robusteval/attacks/defenses.py",
        "        sigma = self.defense.sigma\n        if self.gradient == \"full\" or not torch.is_grad_enabled():",
        "        return x\n        sigma = self.defense.sigma\n"
        "        if self.gradient == \"full\" or not torch.is_grad_enabled():",
        ("tests/test_attacks_known_answer.py::"
         "test_denoise_defense_moves_the_boundary_and_the_attack_finds_the_exact_answer",),
    ),
    Defect(
        "train-mode-pipeline", "the attack pipeline is left in train mode (BatchNorm uses batch statistics)",
        "robusteval/attacks/defenses.py",
        "BatchNorm statistics.\n        self.eval()", "BatchNorm statistics.\n        self.train()",
        ("tests/test_attacks_paths.py::test_attacks_leave_batchnorm_statistics_alone_and_verify_in_eval_mode",),
    ),
    Defect(
        "unchecked-radius", "a record's radius is not checked against its p_A bound",
        "robusteval/records/consistency.py",
        "        if not math.isclose(radius, expected, rel_tol=RADIUS_TOLERANCE",
        "        if False and not math.isclose(radius, expected, rel_tol=RADIUS_TOLERANCE",
        ("tests/test_records_trust.py::test_merge_refuses_a_radius_that_does_not_follow_from_its_bound",),
    ),
    Defect(
        "certify-weights-unfingerprinted", "certify records no fingerprint of its weights",
        "robusteval/smoothing/engine.py",
        "weights = {\"model_fingerprint\": weights_fingerprint(model),",
        "weights = {\"model_fingerprint\": None,",
        (("tests/test_records_trust.py::"
          "test_certify_resumed_with_other_weights_behind_the_path_is_refused_naming_both_fingerprints"),),
    ),
    Defect(
        "paired-denoiser-ignored", "--denoiser is recorded but the input passes undenoised",
        "robusteval/model_zoo/paired.py",
        "return self.denoiser.denoise(x, sigma)", "return x",
        ("tests/test_denoiser_pairing.py::test_another_models_denoiser_is_the_one_that_purifies",),
    ),
    Defect(
        "bpda-is-exact", "wrap's gradient='bpda' differentiates the preprocessing with autograd",
        "robusteval/core/interface.py",
        'if self.gradient == "exact" or not tracking:', "if True:",
        ("tests/test_user_defenses.py::test_bpda_through_bit_depth_reduction_reaches_the_exact_robust_accuracy",),
    ),
    Defect(
        "no-vertex-search", "the gradient-free escalation stops after Square",
        "robusteval/attacks/remedies.py",
        '    if norm == "Linf":\n        stages.append(', '    if False:\n        stages.append(',
        ("tests/test_attacks_no_gradient.py::"
         "test_an_opaque_rounding_front_end_is_attacked_to_within_3_points_of_the_exact_robust_accuracy",),
    ),
    Defect(
        "worst-of-n-column-is-majority", "the leaderboard's worst-of-N column shows the majority vote",
        "robusteval/reports/tables.py",
        'float(p["worst_of_n_robust_accuracy"] if', 'float(p["robust_accuracy"] if',
        ("tests/test_reports_worst_of_n.py::test_worst_of_n_has_its_own_column_beside_the_majority_vote",),
    ),
    Defect(
        "best-of-unadjusted", "the best over several σ gets a plain 95% interval, as if it had not been chosen",
        "robusteval/papers.py",
        "each = [interval(count, total, alpha / len(counts)) for count in counts.values()]",
        "each = [interval(count, total, alpha) for count in counts.values()]",
        ("tests/test_papers_suite.py::"
         "test_the_best_of_several_sigmas_gets_a_simultaneous_interval_that_covers_the_best_true_accuracy",),
    ),
    Defect(
        "first-epoch-checkpoint", "a claim's starred file name takes the first epoch a training wrote",
        "robusteval/papers.py",
        "return max(found, key=_epoch_order)", "return min(found, key=_epoch_order)",
        ("tests/test_papers_suite.py::test_a_starred_file_name_takes_the_last_epoch_the_training_wrote",
         "tests/test_papers_suite.py::"
         "test_papers_suite_certifies_each_sigmas_fine_tune_and_compares_the_best_with_dmaes_table"),
    ),
    Defect(
        "every-ignored", "--every K is recorded but ImageNet's first images are taken, not every K-th",
        "robusteval/data/imagenet.py",
        "    order = order[::every]\n", "    order = order[:]\n",
        ("tests/test_data_cifar100_imagenet.py::"
         "test_every_kth_imagenet_image_comes_from_the_whole_sorted_order_as_in_the_papers_scripts",),
    ),
)


def _copy_tree(destination: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _run(defect: Defect, workers: str) -> tuple[str, list[str], float]:
    """(outcome, red tests, seconds): outcome CAUGHT, SURVIVED or STALE."""
    with tempfile.TemporaryDirectory(prefix=f"plant-{defect.name}-") as scratch:
        copy = Path(scratch)
        _copy_tree(copy)
        target = copy / defect.path
        text = target.read_text() if target.exists() else ""
        if text.count(defect.old) != 1:
            return "STALE", [f"{defect.path}: the anchor text occurs {text.count(defect.old)} times"], 0.0
        target.write_text(text.replace(defect.old, defect.new))
        env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        started = time.perf_counter()
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", "-W", "ignore",
                   "-m", "slow or not slow",
                   *(["-n", workers] if workers else []), *defect.tests]
        done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        red = sorted({m.group(1) for m in re.finditer(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.MULTILINE)})
        if done.returncode == 0:
            return "SURVIVED", [], seconds
        if not red:  # a collection or usage error is not a caught defect
            return "STALE", [done.stdout[-2000:] + done.stderr[-2000:]], seconds
        return "CAUGHT", red, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="defects to plant (default: all)")
    parser.add_argument("--list", action="store_true", help="list the defects and exit")
    parser.add_argument("-n", dest="workers", default="", help="pytest-xdist workers, if installed")
    arguments = parser.parse_args()
    if arguments.list:
        for defect in DEFECTS:
            print(f"{defect.name:28} {defect.what}")
        return 0
    known = {d.name: d for d in DEFECTS}
    unknown = [n for n in arguments.names if n not in known]
    if unknown:
        parser.error(f"unknown defect(s) {', '.join(unknown)}; known: {', '.join(known)}")
    chosen = [known[n] for n in arguments.names] or list(DEFECTS)
    failures = 0
    for defect in chosen:
        outcome, red, seconds = _run(defect, arguments.workers)
        failures += outcome != "CAUGHT"
        print(f"{outcome:8} {defect.name} ({defect.what}; {seconds:.0f} s)", flush=True)
        for line in red:
            print(f"         red: {line}" if outcome == "CAUGHT" else f"         {line}", flush=True)
    print(f"{len(chosen) - failures} of {len(chosen)} planted defects caught")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
