"""Issue 27, item 6: a linear digits classifier behind an 8-level rounding front end, opaque to the engine.

Trains a linear (multinomial logistic) classifier on the digits training split
(full-batch Adam, seeded), puts an 8-level rounding in front of it (Xu et al.
2018's bit-depth reduction to 3 bits, round(7x)/7) inside ONE module (so the engine sees only a zero gradient, never the structure), and
runs `robusteval.evaluate_attack` (AutoAttack, L∞) on the first 200 test
points at ε = 0.03, 0.06 and 0.1. The exact robust accuracy is computed as the
tests do (`tests/attack_fixtures.rounded_linear_robust`: the worst case
separates over pixels for each class pair).

    python benchmarks/bench_rounded_digits.py [--without-vertex-search] [--attack autoattack]

`--without-vertex-search` drops the engine's last gradient-free stage (what
the engine did before it), for the comparison.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import robusteval  # noqa: E402
from robusteval.attacks import batch  # noqa: E402
from attack_fixtures import LinearMulti, Rounded, rounded_linear_robust  # noqa: E402

# 8 levels, 0, 1/7, ..., 1 (3 bits). round(8x)/8 would put the digits' odd sixteenths exactly on its rounding
# thresholds, so every ε below 1/16 would reach the same levels.
LEVELS = 7
EPS = [0.03, 0.06, 0.1]


def train_linear(seed: int = 0, steps: int = 500) -> LinearMulti:
    train = robusteval.load_dataset("digits", split="train")
    torch.manual_seed(seed)
    linear = LinearMulti(torch.zeros(10, 64), torch.zeros(10))
    optimizer = torch.optim.Adam(linear.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(linear(train.x), train.y) + 1e-3 * linear.weight.square().sum()
        loss.backward()
        optimizer.step()
    return linear.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--without-vertex-search", action="store_true")
    parser.add_argument("--attack", default="autoattack")
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    if args.without_vertex_search:
        original = batch.gradient_free_escalation
        batch.gradient_free_escalation = lambda *a, **k: original(*a, **k)[:1]
    linear = train_linear()
    test = robusteval.load_dataset("digits", split="test")
    x, y = test.x[: args.n], test.y[: args.n]
    opaque = robusteval.wrap(Rounded(linear, LEVELS), num_classes=10, input_shape=(1, 8, 8), name="rounded-linear")
    with torch.no_grad():
        clean = float((opaque(x).argmax(1) == y).float().mean())
    started = time.perf_counter()
    result = robusteval.evaluate_attack(opaque, (x, y), attack=args.attack, eps=EPS, device="cpu")
    seconds = time.perf_counter() - started
    print(f"torch {torch.__version__}, {args.attack}, first {args.n} digits test points, clean accuracy {clean:.3f}"
          f"{' (without the vertex search)' if args.without_vertex_search else ''}")
    for point in result.curve:
        exact = float(rounded_linear_robust(linear.weight.data, linear.bias.data, x, y, point.eps, LEVELS)
                      .float().mean())
        print(f"eps={point.eps:g}: exact {exact:.3f}  reported {point.robust_accuracy:.3f}  "
              f"(the attack's own {point.standard_robust_accuracy:.3f})  broken by {dict(point.broken_by)}")
    for flag in result.flags:
        print("flag:", flag)
    print(f"{seconds:.1f} s")


if __name__ == "__main__":
    main()
