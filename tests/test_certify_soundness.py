"""Monte-Carlo soundness: an attack on the smoothed classifier inside the certified radius does not succeed.

For a point certified at radius R with class ĉ, every x' with ‖x' − x‖ < R has
g(x') = ĉ unless the certificate failed (probability ≤ α); PREDICT at x' then
returns another class with probability ≤ α. So an L2 PGD attack with EOT on
the smoothed classifier at ε = 0.9R may change PREDICT's output for at most a
2α fraction of the points, up to binomial sampling slack. The same attack at
ε = 1.5R must succeed often, or it would prove nothing.
"""

import torch
import torch.nn.functional as F
from scipy.stats import binom
from torch import Tensor, nn

import robusteval

SIGMA = 0.25
ALPHA = 0.001
SHAPE = (1, 2, 2)


class Centered(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return (x - 0.5).flatten(1)


def smoothed_pgd(model, x: Tensor, target: Tensor, eps: Tensor, steps: int = 40, samples: int = 256) -> Tensor:
    """L2 PGD on the smoothed soft classifier E_n[softmax f(x + σn)] (expectation over 256 draws per step).

    Stays in the ε ball and in [0, 1] (clipping to the box only shrinks a perturbation).
    """
    generator = torch.Generator().manual_seed(0)
    eps = eps.view(-1, 1, 1, 1)
    step = 2.5 * eps / steps
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        noisy = (x + delta).unsqueeze(0) + SIGMA * torch.randn((samples, *x.shape), generator=generator)
        logits = model.logits(noisy.reshape(-1, *x.shape[1:]), SIGMA).view(samples, x.shape[0], -1)
        smoothed = logits.softmax(-1).mean(0)
        loss = F.nll_loss(smoothed.clamp_min(1e-12).log(), target)
        (grad,) = torch.autograd.grad(loss, delta)
        grad_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = delta.detach() + step * grad / grad_norm
        delta_norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = delta * (eps / delta_norm).clamp(max=1.0)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def changed_predictions(model, x_adv: Tensor, certified_class: Tensor) -> int:
    result = robusteval.predict(model, (x_adv, certified_class), sigma=SIGMA, n=10_000, alpha=ALPHA,
                                batch_size=10_000, device="cpu", compile=False)
    return sum(1 for r in result.records if not r["abstain"] and r["prediction"] != r["label"])


def test_attack_inside_the_certified_radius_does_not_change_predict():
    torch.manual_seed(0)
    network = nn.Sequential(Centered(), nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3))
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.mul_(3)  # sharper boundaries, at the scale of σ
    model = robusteval.wrap(network, 3, SHAPE, name="mlp")
    x = torch.rand((60, *SHAPE), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        labels = network(x).argmax(1)
    assert torch.bincount(labels, minlength=3).min() >= 10  # a genuinely three-class problem

    cert = robusteval.certify(model, (x, labels), sigma=SIGMA, n0=100, n=10_000, alpha=ALPHA,
                              batch_size=10_100, device="cpu", compile=False)
    certified = [i for i, r in enumerate(cert.records) if not r["abstain"]]
    assert len(certified) >= 45
    radius = torch.tensor([cert.records[i]["radius"] for i in certified])
    certified_class = torch.tensor([cert.records[i]["prediction"] for i in certified])
    points = x[certified]

    allowed = int(binom.ppf(1 - 1e-3, len(certified), 2 * ALPHA))
    inside = changed_predictions(model, smoothed_pgd(model, points, certified_class, 0.9 * radius), certified_class)
    assert inside <= allowed, f"{inside} of {len(certified)} certified points changed class inside 0.9R"

    outside = changed_predictions(model, smoothed_pgd(model, points, certified_class, 1.5 * radius), certified_class)
    assert outside >= len(certified) // 3, f"the attack is too weak to test anything: {outside} changes at 1.5R"
