"""Benchmark: robusteval's attack engine vs calling pyautoattack and torchattacks directly.

On the same model, the same points and the same seed, in one process:

1. `autoattack` at one ε: `robusteval.evaluate_attack(..., attack="autoattack")`
   (writing its run directory) against `pyautoattack.AutoAttack(version='standard')
   .run_standard_evaluation` on the model itself, as a user would call it.
   Both attack the points in one batch with the seed the engine derives for it,
   so both run the very same attacks and the robust accuracies must be equal.
2. `autoattack` over an ε list: the engine once (it reuses breaks from smaller ε
   and attacks only what is left) against one direct AutoAttack call per ε.
3. `pgd`: the engine against `torchattacks.PGD` with the same ε, step size
   (ε/4) and steps (10), plus the two forward passes that give the clean and
   robust accuracy. Random starts differ (the engine attacks only the
   correctly classified points), so the accuracies agree within a few points.
   With its defaults the engine also takes input gradients at the clean
   points (the zero-gradient check) and runs AutoAttack's checks on 64
   points, fixed costs that weigh on a 10-step attack: `pgd` times the
   defaults, `pgd_equal_work` the engine with `masking_checks=False` (still
   verifying every example and writing its run directory).

Printed: wall time of each, the ratio robusteval / direct (goal ≤ 1.05 at
equal work) and the robust accuracies. The engine's extra gradient-masking
run at a very large ε is switched off for the equal-work comparison, and
timed on its own.

    python benchmarks/bench_attacks.py                          # standard model, 100 points
    python benchmarks/bench_attacks.py --model egc --n 200      # another zoo model
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import torch

import robusteval
from robusteval.attacks.seeds import attack_seed
from robusteval.core.devices import resolve_device


def _timed(function):
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return int((model(x).argmax(1) == y).sum()) / len(y)


def _direct_autoattack(model, x, y, eps: float, norm: str, seed: int, device: torch.device) -> float:
    from pyautoattack import AutoAttack

    adversary = AutoAttack(model, norm=norm, eps=eps, version="standard", seed=seed, device=device)
    adversary.verbose = False
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=x.shape[0])
    return _accuracy(model, x_adv, y)


def _engine(model, data, *, attack: str, eps: list[float], n: int, seed: int, device: torch.device,
            large_eps_check: bool = False, masking_checks: bool = True) -> robusteval.AttackResult:
    with tempfile.TemporaryDirectory() as out:
        return robusteval.evaluate_attack(model, data, attack=attack, eps=eps, n=n, batch_size=n, seed=seed,
                                          device=device, out=Path(out) / "run", large_eps_check=large_eps_check,
                                          masking_checks=masking_checks)


@click.command()
@click.option("--model", "model_name", default="standard", show_default=True, help="A zoo model with digits weights.")
@click.option("--n", type=int, default=100, show_default=True, help="Test points for the AutoAttack comparisons.")
@click.option("--pgd-n", type=int, default=500, show_default=True, help="Test points for the PGD comparison.")
@click.option("--eps", type=float, default=0.1, show_default=True, help="The single-ε comparison's radius (L∞).")
@click.option("--eps-list", default="0.05,0.1,0.15,0.2,0.3", show_default=True, help="The ε-list comparison.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads.")
@click.option("--repeats", type=int, default=9, show_default=True, help="Repeats of the (fast) PGD timings; best kept.")
@click.option("--only", "parts", type=click.Choice(["autoattack", "pgd"]), multiple=True,
              default=("autoattack", "pgd"), show_default=True, help="Run only these comparisons.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def main(model_name: str, n: int, pgd_n: int, eps: float, eps_list: str, seed: int, device: str, threads: int,
         repeats: int, parts: tuple[str, ...], as_json: bool) -> None:
    torch.set_num_threads(threads)
    target = resolve_device(device)
    data = robusteval.load_dataset("digits")
    model = robusteval.create_model(model_name, device=target)
    x, y = data.x[:n].to(target), data.y[:n].to(target)
    _accuracy(model, x, y)  # warm-up
    figures: dict[str, dict[str, float]] = {}

    if "autoattack" in parts:
        # 1. AutoAttack at one ε, equal work.
        direct_acc, direct_s = _timed(lambda: _direct_autoattack(model, x, y, eps, "Linf", attack_seed(seed, 0, 0), target))
        engine_result, engine_s = _timed(lambda: _engine(model, data, attack="autoattack", eps=[eps], n=n, seed=seed,
                                                         device=target))
        figures["autoattack_single_eps"] = {
            "eps": eps, "n": n, "robusteval_s": engine_s, "direct_s": direct_s, "ratio": engine_s / direct_s,
            "robusteval_acc": engine_result.curve[0].robust_accuracy, "direct_acc": direct_acc,
            "agree": engine_result.curve[0].robust_accuracy == direct_acc,
        }

        # 2. AutoAttack over an ε list: one engine run against one direct call per ε.
        radii = [float(e) for e in eps_list.split(",")]
        direct_accs, direct_s = _timed(lambda: [
            _direct_autoattack(model, x, y, e, "Linf", attack_seed(seed, 0, i), target) for i, e in enumerate(radii)])
        engine_result, engine_s = _timed(lambda: _engine(model, data, attack="autoattack", eps=radii, n=n, seed=seed,
                                                         device=target))
        engine_accs = [p.robust_accuracy for p in engine_result.curve]
        figures["autoattack_eps_list"] = {
            "eps": radii, "n": n, "robusteval_s": engine_s, "direct_s": direct_s, "ratio": engine_s / direct_s,
            "robusteval_acc": engine_accs, "direct_acc": direct_accs,
            # Reused breaks can only make the engine's figure lower (stronger) than an independent run per ε.
            "max_abs_diff": max(abs(a - b) for a, b in zip(engine_accs, direct_accs)),
        }
        _, checked_s = _timed(lambda: _engine(model, data, attack="autoattack", eps=radii, n=n, seed=seed, device=target,
                                              large_eps_check=True))
        figures["autoattack_eps_list"]["robusteval_with_large_eps_check_s"] = checked_s

    # 3. PGD, the engine against torchattacks.PGD on all points.
    if "pgd" in parts:
        figures.update(_pgd(model, data, eps=eps, n=pgd_n, seed=seed, device=target, repeats=repeats))

    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    click.echo(f"model {model_name}, digits, L∞, device {target}, {threads} thread(s), seed {seed}")
    for name, f in figures.items():
        click.echo(f"{name:24s} n={f['n']:<4d} robusteval {f['robusteval_s']:8.2f} s  direct {f['direct_s']:8.2f} s  "
                   f"ratio {f['ratio']:.3f}  robust acc robusteval {f['robusteval_acc']}  direct {f['direct_acc']}")
    if "autoattack" in parts:
        click.echo(f"autoattack_eps_list with the large-eps check: "
                   f"{figures['autoattack_eps_list']['robusteval_with_large_eps_check_s']:.2f} s")


def _pgd(model, data, *, eps: float, n: int, seed: int, device: torch.device,
         repeats: int) -> dict[str, dict[str, float]]:
    import torchattacks

    xp, yp = data.x[:n].to(device), data.y[:n].to(device)
    pgd = torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=10, random_start=True)

    def direct_pgd() -> float:
        # What the engine reports: clean accuracy, then robust accuracy on a forward pass of the examples.
        _accuracy(model, xp, yp)
        torch.manual_seed(attack_seed(seed, 0, 0))
        return _accuracy(model, pgd(xp, yp), yp)

    def engine_pgd(masking_checks: bool) -> robusteval.AttackResult:
        return _engine(model, data, attack="pgd", eps=[eps], n=n, seed=seed, device=device,
                       masking_checks=masking_checks)

    # Interleaved, so a slow spell of the machine weighs on all three alike.
    direct_runs, engine_runs, bare_runs = [], [], []
    for _ in range(repeats):
        direct_runs.append(_timed(direct_pgd))
        engine_runs.append(_timed(lambda: engine_pgd(True)))
        bare_runs.append(_timed(lambda: engine_pgd(False)))
    direct_best = min(s for _, s in direct_runs)
    figures: dict[str, dict[str, float]] = {}
    for name, runs in (("pgd", engine_runs), ("pgd_equal_work", bare_runs)):
        best = min(s for _, s in runs)
        figures[name] = {
            "eps": eps, "n": n, "robusteval_s": best, "direct_s": direct_best, "ratio": best / direct_best,
            "robusteval_acc": runs[0][0].curve[0].robust_accuracy, "direct_acc": direct_runs[0][0],
        }
    return figures


if __name__ == "__main__":
    main()
