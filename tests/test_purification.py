"""purify:S:K[:sampler]: the documented updates, exact and checkpointed gradients, bounded memory, resume."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from attack_fixtures import SHAPE, GaussianTweedie, linear_problem
from click.testing import CliRunner
from torch import Tensor, nn

import robusteval
from robusteval.attacks.defenses import DeployedPipeline
from robusteval.attacks.purification import draw_noise, purify, sigma_schedule
from robusteval.cli import main
from robusteval.core.errors import UsageError
from robusteval.core.interface import trusted_inputs
from robusteval.core.saved_memory import SavedTensorBytes
from robusteval.core.vocabulary import gradient_variants, parse_defense, parse_gradient
from robusteval.model_zoo.factory import create_model

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def cdn():
    return create_model("cdn").eval()


def _digits(n: int) -> tuple[Tensor, Tensor]:
    data = robusteval.load_dataset("digits")
    return data.x[:n], data.y[:n]


# --- the grammar ----------------------------------------------------------------------------------------
def test_purify_grammar_and_gradient_forms():
    spec = parse_defense("purify:0.25:4")
    assert (spec.kind, spec.sigma, spec.steps, spec.sampler) == ("purify", 0.25, 4, "ddpm")
    assert str(spec) == "purify:0.25:4" and spec.randomized and spec.differentiates_through
    assert str(parse_defense("purify:0.25:4:DDIM")) == "purify:0.25:4:ddim"
    for bad in ("purify", "purify:0.25", "purify:0:3", "purify:0.25:0", "purify:0.25:2:euler", "purify:0.2:2:x:y"):
        with pytest.raises(UsageError, match="purify|S must"):
            parse_defense(bad)
    assert parse_gradient("surrogate:3", spec) == "surrogate:3"
    with pytest.raises(UsageError, match="purify defenses only"):
        parse_gradient("surrogate:3", parse_defense("denoise:0.25"))
    with pytest.raises(UsageError, match="surrogate needs"):
        parse_gradient("surrogate:0", spec)
    assert gradient_variants("auto", spec) == ["full", "bpda", "surrogate:1"]
    assert gradient_variants("auto", parse_defense("purify:0.25:1")) == ["full", "bpda"]


def test_sigma_schedule_is_edm_rho_7_from_s_to_sigma_min_then_zero():
    assert sigma_schedule(0.25, 1) == [0.25, 0.0]
    sigmas = sigma_schedule(0.25, 5)
    rho, high, low = 7.0, 0.25 ** (1 / 7), 0.01 ** (1 / 7)
    expected = [(high + i / 4 * (low - high)) ** rho for i in range(5)] + [0.0]
    assert sigmas == pytest.approx(expected, rel=1e-12) and sigmas[0] == 0.25 and sigmas[4] == pytest.approx(0.01)
    assert all(a > b for a, b in itertools.pairwise(sigmas))


# --- the forward pass -----------------------------------------------------------------------------------
def test_one_ddim_step_is_denoise_exactly(cdn):
    x, _ = _digits(16)
    # The purifier with no start noise is the one-shot denoiser denoise:S, bit for bit ...
    zero = draw_noise(x, 1, "ddim", start=torch.zeros_like(x))
    assert torch.equal(purify(cdn.denoise, x, sigma_schedule(0.25, 1), "ddim", zero), cdn.denoise(x, 0.25))
    # ... and the pipeline purify:S:1:ddim is denoise:S:noise draw for draw (both add N(0, S²) first).
    one = DeployedPipeline(cdn, parse_defense("purify:0.25:1:ddim"))
    noisy = DeployedPipeline(cdn, parse_defense("denoise:0.25:noise"))
    with trusted_inputs():
        torch.manual_seed(3)
        a = one(x)
        torch.manual_seed(3)
        b = noisy(x)
    assert torch.equal(a, b)


def _reference(model, x: Tensor, sigma: float, steps: int, sampler: str, seed: int) -> Tensor:
    """The module docstring's equations, written out: the draws n, z_1 … z_{K−1} in that order."""
    rho, s_min = 7.0, min(0.01, sigma)
    sigmas = [sigma] + [(sigma ** (1 / rho) + i / (steps - 1) * (s_min ** (1 / rho) - sigma ** (1 / rho))) ** rho
                        for i in range(1, steps)] + [0.0]
    torch.manual_seed(seed)
    n = torch.randn_like(x)
    zs = [torch.randn_like(x) for _ in range(steps - 1)] if sampler == "ddpm" else []
    state = x + sigma * n
    for k in range(steps):
        hat = model.denoise(state, sigmas[k])
        s, t = sigmas[k], sigmas[k + 1]
        if sampler == "ddim":
            state = hat + (t / s) * (state - hat)
        else:
            noise = t * math.sqrt(1 - t**2 / s**2) * zs[k] if t > 0 else 0.0
            state = hat + (t**2 / s**2) * (state - hat) + noise
    return state


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_k_step_forward_equals_the_documented_updates(cdn, sampler):
    x, _ = _digits(8)
    pipeline = DeployedPipeline(cdn, parse_defense(f"purify:0.3:4:{sampler}"))
    with trusted_inputs():
        expected = cdn.logits(_reference(cdn, x, 0.3, 4, sampler, seed=11), 0.0)
        torch.manual_seed(11)
        got = pipeline(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    # Different draws give a different purification (it is randomized), the same seed the same one.
    with trusted_inputs():
        torch.manual_seed(12)
        assert not torch.allclose(pipeline(x), expected, atol=1e-3)


def _gaussian_model(tau: float = 0.3) -> GaussianTweedie:
    model, _, _, _ = linear_problem(n=1)
    w, b = model.module.w.detach(), model.module.b.detach()
    return GaussianTweedie(torch.stack([-w / 2, w / 2]), torch.stack([-b / 2, b / 2]), mean=0.5, tau=tau).eval()


def test_many_ddim_steps_follow_the_gaussian_probability_flow():
    # For a N(μ, τ²) prior the flow from σ = S to 0 is x ↦ μ + τ/√(τ² + S²)·(x − μ) (x − μ scales with √(τ² + σ²)).
    tau, sigma = 0.3, 0.4
    model = _gaussian_model(tau)
    x = torch.rand(4, *SHAPE, dtype=torch.float64)
    start = torch.randn_like(x)
    noise = draw_noise(x, 400, "ddim", start=start)
    out = purify(model.double().denoise, x, sigma_schedule(sigma, 400), "ddim", noise)
    exact = 0.5 + tau / math.sqrt(tau**2 + sigma**2) * (x + sigma * start - 0.5)
    # The last step jumps from σ_min = 0.01 to 0 with the posterior mean: an error of order σ_min²/τ².
    assert torch.allclose(out, exact, atol=2e-3)


def test_gradients_full_bpda_and_surrogate_have_their_known_values():
    # The Gaussian denoiser is affine: x̂ = a·x + (1 − a)·μ with a = τ²/(τ² + σ²), so a ddim step has slope
    # a + (σ'/σ)(1 − a), a ddpm step a + (σ'/σ)²(1 − a); the full gradient of a logit is w times their product.
    tau, sigma, steps = 0.3, 0.25, 4
    model = _gaussian_model(tau)
    sigmas = sigma_schedule(sigma, steps)
    x = (torch.rand(3, *SHAPE) * 0.5 + 0.25).requires_grad_(True)
    w = model.weight[1].detach().view(1, *SHAPE)
    for sampler, power in (("ddim", 1), ("ddpm", 2)):
        spec = parse_defense(f"purify:{sigma}:{steps}:{sampler}")
        slopes = [tau**2 / (tau**2 + s**2) for s in sigmas[:-1]]
        full = math.prod(a + (t / s) ** power * (1 - a) for a, s, t in zip(slopes, sigmas, sigmas[1:]))
        expected = {"full": full, "bpda": 1.0, "surrogate:1": slopes[0]}
        for mode, factor in expected.items():
            pipeline = DeployedPipeline(model, spec, mode)
            (grad,) = torch.autograd.grad(pipeline(x)[:, 1].sum(), x)
            assert torch.allclose(grad, factor * w.expand_as(grad), atol=1e-5), (sampler, mode)
        # Every mode's forward value is the K-step purification: same draws, same logits.
        values = []
        for mode in expected:
            torch.manual_seed(4)
            values.append(DeployedPipeline(model, spec, mode)(x).detach())
        assert all(torch.allclose(v, values[0], atol=1e-6) for v in values)


# --- checkpointing: exact gradients, bounded memory -----------------------------------------------------
class _TinyTweedie(robusteval.JointModel):
    """A small nonlinear density, log p_σ(x) = logsumexp MLP(x, σ), with its Tweedie denoiser (autograd inside)."""

    capabilities = frozenset({"logits", "denoise"})

    def __init__(self):
        super().__init__()
        self.name, self.num_classes, self.input_shape = "tiny-tweedie", 3, SHAPE
        generator = torch.Generator().manual_seed(0)
        self.hidden = nn.Parameter(torch.randn(65, 16, generator=generator) / 8)
        self.out = nn.Parameter(torch.randn(16, 3, generator=generator) / 4)

    def _logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        features = torch.cat([x.flatten(1), sigma.view(-1, 1).to(x.dtype)], 1)
        return torch.tanh(features @ self.hidden) @ self.out

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        create_graph = torch.is_grad_enabled() and x.requires_grad
        with torch.enable_grad():
            inputs = x if x.requires_grad else x.detach().requires_grad_(True)
            (score,) = torch.autograd.grad(self._logits(inputs, sigma).logsumexp(1).sum(), inputs,
                                           create_graph=create_graph)
        out = inputs + sigma.view(-1, 1, 1, 1).to(x.dtype) ** 2 * score
        return out if create_graph else out.detach()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_checkpointed_full_gradients_equal_the_plain_ones(sampler):
    model = _TinyTweedie().double().eval()
    x = torch.rand(5, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointed in (True, False):
        inputs = x.clone().requires_grad_(True)
        pipeline = DeployedPipeline(model, parse_defense(f"purify:0.3:6:{sampler}"), "full", checkpointed=checkpointed)
        torch.manual_seed(7)
        with trusted_inputs():
            loss = torch.log_softmax(pipeline(inputs), 1)[:, 0].sum()
        grads.append(torch.autograd.grad(loss, inputs)[0])
    assert grads[0].abs().max() > 1e-3
    assert (grads[0] - grads[1]).abs().max() <= 1e-10


def _saved_peak(model, x: Tensor, steps: int, checkpointed: bool) -> int:
    counter = SavedTensorBytes()
    pipeline = DeployedPipeline(model, parse_defense(f"purify:0.25:{steps}"), "full", checkpointed=checkpointed)
    inputs = x.clone().requires_grad_(True)
    # The hooks see the forward's saved tensors and, since the backward runs inside them too, the tensors a
    # checkpointed step saves while it is recomputed.
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack), trusted_inputs():
        torch.autograd.grad(pipeline(inputs).logsumexp(1).sum(), inputs)
    return counter.peak


def test_peak_saved_activation_memory_does_not_grow_with_k(cdn):
    x, _ = _digits(16)
    stored = 2 * x.numel() * x.element_size()  # what a checkpointed step keeps: its input and its draw z
    one, eight = _saved_peak(cdn, x, 1, True), _saved_peak(cdn, x, 8, True)
    assert eight - one <= 7 * stored  # seven more steps: seven more stored inputs, nothing else
    plain_one, plain_eight = _saved_peak(cdn, x, 1, False), _saved_peak(cdn, x, 8, False)
    # Without checkpointing every step's activations stay alive until the backward pass.
    assert plain_eight - plain_one > 100 * (eight - one)


# --- the engine: EOT, decisions, resume, the command line --------------------------------------------------
_KILLED_PURIFY = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    import torch
    import robusteval
    from robusteval.attacks.defenses import DeployedPipeline
    from attack_fixtures import GaussianTweedie, linear_problem

    real = DeployedPipeline._purified
    partial = Path({out!r}) / "partial_batch00000.pt"

    def purified(self, x):
        # Die inside a purification, under an attack's gradient, once the first eps's partial state is saved.
        if partial.exists() and torch.is_grad_enabled():
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, x)

    DeployedPipeline._purified = purified
    model, x, y, _ = linear_problem(n=10)
    w, b = model.module.w.detach(), model.module.b.detach()
    tweedie = GaussianTweedie(torch.stack([-w / 2, w / 2]), torch.stack([-b / 2, b / 2]), mean=0.5, tau=0.3)
    robusteval.evaluate_attack(tweedie, (x, y), out={out!r}, **{kwargs!r})
""")


@pytest.mark.slow  # ~10-13 s on a shared 2-core machine
def test_a_run_killed_inside_a_purify_attack_resumes_to_the_uninterrupted_result(tmp_path):
    kwargs = {"attack": "pgd", "eps": [0.02, 0.05, 0.08], "defense": "purify:0.2:3", "eot": 2, "decision_draws": 5,
              "batch_size": 10, "device": "cpu", "seed": 4, "large_eps_check": False, "steps": 3}
    _, x, y, _ = linear_problem(n=10)
    model = _gaussian_model()
    fresh = robusteval.evaluate_attack(model, (x, y), out=tmp_path / "fresh", **kwargs)
    assert fresh.gradient == "auto" and fresh.eot == 2
    out = tmp_path / "killed"
    script = _KILLED_PURIFY.format(tests=str(TESTS), out=str(out), kwargs=kwargs)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=600,
                            check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert (out / "partial_batch00000.pt").exists() and not (out / "summary.json").exists()
    resumed = robusteval.evaluate_attack(model, (x, y), out=out, **kwargs)
    assert resumed.summary() | {"seconds": 0} == fresh.summary() | {"seconds": 0}
    strip = lambda records: [{k: v for k, v in r.items() if k != "batch_seconds"} for r in records]
    assert strip(resumed.records) == strip(fresh.records)
    assert all(torch.equal(resumed.adversarial[e], fresh.adversarial[e]) for e in kwargs["eps"])
    for point in fresh.curve:  # randomized: the majority vote and worst-of-N beside it
        assert point.worst_of_n_robust_accuracy is not None
        assert point.worst_of_n_robust_accuracy <= point.robust_accuracy


def test_cli_run_cdn_with_purify_records_the_defense_and_gradient(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", "--model", "cdn", "--defense", "purify:0.25:2", "--attack", "fgsm",
                                       "--eps", "0.05", "--n", "4", "--eot", "2", "--decision-draws", "3",
                                       "--device", "cpu", "--no-large-eps-check", "--no-masking-checks", "--quiet",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["defense"] == "purify:0.25:2" and config["gradient"] == "auto" and config["eot"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["defense"] == "purify:0.25:2" and len(summary["curve"]) == 1
    # Every gradient of `auto` was attacked (the zero-gradient checks stand in, switched off, one per variant).
    names = {c["check"] for c in summary["checks"]}
    assert {"zero-gradients", "zero-gradients-bpda", "zero-gradients-surrogate:1"} <= names
    surrogate = CliRunner().invoke(main, ["run", "--model", "cdn", "--defense", "purify:0.25:2", "--gradient",
                                          "surrogate:1", "--attack", "fgsm", "--eps", "0.05", "--n", "2",
                                          "--device", "cpu", "--no-large-eps-check", "--no-masking-checks",
                                          "--quiet"])
    assert surrogate.exit_code == 0, surrogate.output
    wrong = CliRunner().invoke(main, ["run", "--model", "cdn", "--defense", "denoise:0.25", "--gradient",
                                      "surrogate:2", "--n", "2", "--device", "cpu"])
    assert wrong.exit_code == 2 and "purify defenses only" in wrong.output


def test_the_official_jdm_architecture_purifies_with_checkpointed_gradients_equal_to_plain_ones(tmp_path):
    from test_official_diffusion import ONE_LEVEL, SMALL, images, load_jdm, save_jdm

    path, _ = save_jdm(tmp_path, ONE_LEVEL)
    model = load_jdm(SMALL, path).eval()  # float32: its timestep embedding is built in float32
    x = images(2, size=16)
    grads = []
    for checkpointed in (True, False):
        inputs = x.clone().requires_grad_(True)
        pipeline = DeployedPipeline(model, parse_defense("purify:0.25:3"), "full", checkpointed=checkpointed)
        torch.manual_seed(5)
        with trusted_inputs():
            loss = torch.log_softmax(pipeline(inputs), 1)[:, 0].sum()
        grads.append(torch.autograd.grad(loss, inputs)[0])
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-5 * float(grads[1].abs().max()))
