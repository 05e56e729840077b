"""The automatic compile decision of both certification samplers: a probe pass discounts library-bound time.

(Kept beside the sequential tests while the engines move into packages; it covers `BaseClassifierRunner`,
which CERTIFY's sampler and the sequential one share.)
"""

import pytest
import torch

from robusteval.smoothing import sampler


class Clocked(torch.nn.Module):
    """Advances a fake clock by `cost` per forward."""

    def __init__(self, now: list[float], cost: float):
        super().__init__()
        self.now, self.cost = now, cost

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.now[0] += self.cost
        return x


class ClockedLinear(torch.nn.Linear):
    def __init__(self, now: list[float], cost: float):
        super().__init__(4, 4)
        self.now, self.cost = now, cost

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.now[0] += self.cost
        return x


def test_library_bound_share_is_the_time_inside_linear_modules():
    now = [0.0]
    model = torch.nn.Sequential(ClockedLinear(now, 2.0), Clocked(now, 1.0), ClockedLinear(now, 1.0))
    x = torch.zeros(3, 4)
    assert sampler.library_bound_share(model, model, x, clock=lambda: now[0]) == pytest.approx(0.75)
    # The hooks are gone afterwards: a second pass sees no extra calls to the clock.
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    no_linear = torch.nn.Sequential(Clocked(now, 1.0))
    assert sampler.library_bound_share(no_linear, no_linear, x, clock=lambda: now[0]) == 0.0


@pytest.mark.parametrize("share, compiles", [(0.0, True), (0.2, True), (0.7, False)])
def test_auto_compile_discounts_the_library_bound_share(share, compiles):
    """Eager time to come 3x the payoff: compiled unless over 2/3 of it is in library-bound modules."""
    payoff = sampler.compile_payoff_seconds("cpu")
    now, built, probed = [0.0], [], []

    def eager(noisy):
        now[0] += 0.1
        return torch.zeros(noisy.shape[0], dtype=torch.long)

    def probe(noisy):
        probed.append(1)
        return share

    runner = sampler.BaseClassifierRunner(eager, lambda: built.append(1) or eager, None, clock=lambda: now[0],
                                          probe=probe)
    x = torch.zeros(4, 1, 2, 2)
    for _ in range(sampler.TIMED_EAGER_PASSES + 1):
        runner(x, int(3 * payoff / 0.1))
    assert bool(built) == compiles and probed == [1]
    assert runner.timing["library_bound_share"] == share
    assert runner.timing["projected_eager_seconds"] == pytest.approx(3 * payoff, rel=1e-6)
    # Below the payoff anyway, no probe pass is spent.
    runner = sampler.BaseClassifierRunner(eager, lambda: built.append(1) or eager, None, clock=lambda: now[0],
                                          probe=probe)
    for _ in range(sampler.TIMED_EAGER_PASSES + 1):
        runner(x, int(0.5 * payoff / 0.1))
    assert probed == [1] and "library_bound_share" not in runner.timing


def test_the_engine_probes_direct_cpu_passes_only():
    """Direct mode on the CPU gets the probe (the host clock is the device's there); denoised mode, whose compiled
    part is the head alone, decides as before. (Measured shares: cdn 0.59-0.66, gaussian ≤ 0.001; RESULTS.md.)"""
    import robusteval
    from robusteval.smoothing import engine
    from robusteval.smoothing.settings import certify_settings

    model = robusteval.create_model("cdn", dataset="digits").eval()
    runners = {}
    for mode in ("direct", "denoised"):
        settings = certify_settings(sigma=0.25, n0=10, n=100, alpha=0.001, mode=mode, seed=0, method="cohen",
                                    radii=None, n_max=None)
        runners[mode] = engine._base_classifier(model, settings, 50, torch.device("cpu"), torch.float32, None)
    assert runners["denoised"]._probe is None and runners["direct"]._probe is not None
    with torch.inference_mode():
        share = runners["direct"]._probe(torch.rand(50, *model.input_shape))
    assert 0.0 < share <= 1.0  # the CDN has nn.Linear layers, so some time is inside them
