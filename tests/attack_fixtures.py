"""Shared fixtures of the attack tests: a binary linear classifier with known adversarial distances."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import robusteval

SHAPE = (1, 8, 8)


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact two-sided interval from its definition: Beta quantiles (0 and 1 at the ends)."""
    from scipy.stats import beta

    tail = (1 - level) / 2
    low = 0.0 if k == 0 else float(beta.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - tail, k + 1, n - k))
    return low, high


class LinearBinary(nn.Module):
    """Two logits ±(w·x + b)/2: class 1 exactly where w·x + b > 0."""

    def __init__(self, w: Tensor, b: float):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(torch.tensor(float(b)))

    def forward(self, x: Tensor) -> Tensor:
        margin = x.flatten(1) @ self.w + self.b
        return torch.stack([-margin / 2, margin / 2], dim=1)


def linear_problem(n: int = 200, seed: int = 0,
                   shape: tuple[int, int, int] = SHAPE) -> tuple[robusteval.JointModel, Tensor, Tensor, Tensor]:
    """A wrapped linear classifier, points x (n, *shape), labels y and signed L2 distances to its boundary.

    Each point is placed at a chosen signed L2 distance d ∈ [-1, 1] from the
    hyperplane w·x + b = 0 through the mid-grey image; its label is the side
    it lies on, so the clean accuracy is 100%.
    """
    g = torch.Generator().manual_seed(seed)
    dim = shape[0] * shape[1] * shape[2]
    sign = torch.where(torch.rand(dim, generator=g) < 0.5, -1.0, 1.0)
    w = sign * (0.8 + 0.4 * torch.rand(dim, generator=g))
    b = -float(w.sum()) * 0.5  # the hyperplane passes through x = 0.5
    unit = w / w.norm()
    distance = torch.rand(n, generator=g) * 2 - 1
    base = 0.35 + 0.3 * torch.rand(n, dim, generator=g)
    current = (base - 0.5) @ unit
    x = base + (distance - current).unsqueeze(1) * unit
    y = (distance > 0).long()
    model = robusteval.wrap(LinearBinary(w, b), num_classes=2, input_shape=shape, name="linear")
    return model, x.view(n, *shape), y, distance


def l1_box_distance(x: Tensor, direction: Tensor, gap: Tensor) -> Tensor:
    """The exact minimal ‖δ‖₁ with direction·δ <= −gap and x + δ in [0, 1] (inf where the box forbids it).

    A fractional knapsack: lowering direction·δ by t on coordinate i costs t/|d_i| of L1, up to the box
    limit (x_i going down where d_i > 0, 1 − x_i going up where d_i < 0). The cheapest way spends the budget on
    the coordinates of largest |d_i| first, each up to its limit. x, direction: (n, dim) (a direction may be
    (dim,)); gap: (n,) >= 0.
    """
    x = x.double()
    d = direction.double().expand_as(x)
    limit = torch.where(d > 0, x, 1 - x)
    weight, order = d.abs().sort(1, descending=True)
    limit = limit.gather(1, order)
    reach = (weight * limit).cumsum(1)  # how far direction·δ has gone down after the first k coordinates, full
    spent = limit.cumsum(1)
    gap = gap.double()
    full = (reach < gap.unsqueeze(1)).sum(1)  # coordinates used up to their limit
    last = full.clamp(max=x.shape[1] - 1).unsqueeze(1)
    before = (last - 1).clamp_min(0)
    reach_before = torch.where(last > 0, reach.gather(1, before), 0.0).squeeze(1)
    spent_before = torch.where(last > 0, spent.gather(1, before), 0.0).squeeze(1)
    cost = spent_before + (gap - reach_before) / weight.gather(1, last).squeeze(1)
    return torch.where(full < x.shape[1], cost, torch.full_like(cost, float("inf")))


class Constant(nn.Module):
    """Logits that ignore the input: always the same class."""

    def __init__(self, num_classes: int = 10, winner: int = 3):
        super().__init__()
        logits = torch.zeros(num_classes)
        logits[winner] = 1.0
        self.register_buffer("logits", logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.logits.expand(x.shape[0], -1) + 0 * x.flatten(1).sum(1, keepdim=True)


class GaussianTweedie(robusteval.JointModel):
    """A linear classifier plus the exact Tweedie denoiser of a Gaussian prior N(μ, τ²I).

    log p_σ(x) = −‖x − μ‖² / (2(τ² + σ²)) + const, and denoise(x, σ) = x + σ² ∇ log p_σ(x)
    is computed with autograd (a graph is built when the caller needs gradients, as the
    zoo's Tweedie denoisers do), so it equals (τ²·x + σ²·μ) / (τ² + σ²) exactly.
    """

    capabilities = frozenset({"logits", "denoise"})

    def __init__(self, weight: Tensor, bias: Tensor, mean: float | Tensor = 0.5, tau: float = 0.3):
        super().__init__()
        self.name = "gaussian-tweedie"
        self.num_classes = weight.shape[0]
        self.input_shape = SHAPE
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())
        # The prior's mean: a grey level, or an image (a buffer, so it moves with the model).
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).expand(SHAPE).clone())
        self.tau = tau

    def _logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        return x.flatten(1) @ self.weight.t() + self.bias

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            inputs = x if x.requires_grad else x.detach().requires_grad_(True)
            s2 = sigma.view(-1, 1, 1, 1) ** 2
            log_p = -((inputs - self.mean) ** 2 / (2 * (self.tau**2 + s2))).sum()
            (score,) = torch.autograd.grad(log_p, inputs, create_graph=create_graph)
        out = inputs + s2 * score
        return out if create_graph else out.detach()


class LinearMulti(nn.Module):
    """Logits W·x + b over K classes."""

    def __init__(self, weight: Tensor, bias: Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.weight.t() + self.bias


def multiclass_problem(n: int = 30, classes: int = 10, shape: tuple[int, int, int] = SHAPE,
                       seed: int = 0) -> tuple[robusteval.JointModel, Tensor, Tensor, dict[str, Tensor]]:
    """A K-class linear classifier, points near mid-grey labelled by it, and their exact minimal distances.

    The distance from x to the region of class j ≠ y is (z_y − z_j)/‖w_y − w_j‖_* in the dual norm (ℓ1 for
    L∞, ℓ2 for L2); the minimal adversarial distance is the minimum over j. The points lie in [0.25, 0.75]
    and every L∞ distance is below 0.2, so the minimisers stay inside [0, 1]: these are the box-constrained
    answers. L1 puts the whole change on few coordinates, where the box binds: its distance is the
    box-constrained knapsack of `l1_box_distance` for each class j, minimised over j.
    """
    g = torch.Generator().manual_seed(seed)
    dim = shape[0] * shape[1] * shape[2]
    weight = torch.randn(classes, dim, generator=g)
    bias = -0.5 * weight.sum(1)  # every class meets at the mid-grey image: the labels vary
    x = 0.25 + 0.5 * torch.rand(n, dim, generator=g)
    logits = x @ weight.t() + bias
    y = logits.argmax(1)
    gap = logits.gather(1, y.view(-1, 1)) - logits  # (n, K), 0 at y
    difference = weight[y].unsqueeze(1) - weight.unsqueeze(0)  # (n, K, dim)
    own = torch.nn.functional.one_hot(y, classes).bool()
    linf = (gap / difference.abs().sum(2).clamp_min(1e-12)).masked_fill(own, float("inf")).amin(1)
    l2 = (gap / difference.norm(dim=2).clamp_min(1e-12)).masked_fill(own, float("inf")).amin(1)
    assert float(linf.max()) < 0.2
    l1 = torch.stack([l1_box_distance(x, difference[:, j], gap[:, j]) for j in range(classes)], 1)
    l1 = l1.masked_fill(own, float("inf")).amin(1).float()
    model = robusteval.wrap(LinearMulti(weight, bias), num_classes=classes, input_shape=shape, name="linear-multi")
    return model, x.view(n, *shape), y, {"Linf": linf, "L2": l2, "L1": l1}
class Scaled(nn.Module):
    """A module's logits times a constant: ×1e4 saturates softmax in float32 (the CE gradient underflows to 0)."""

    def __init__(self, module: nn.Module, factor: float):
        super().__init__()
        self.module = module
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x) * self.factor


class Rounded(nn.Module):
    """A module behind a rounding front end (pixels to multiples of 1/levels): no usable input gradient."""

    def __init__(self, module: nn.Module, levels: int = 8):
        super().__init__()
        self.module = module
        self.levels = levels

    def forward(self, x: Tensor) -> Tensor:
        return self.module(torch.round(x * self.levels) / self.levels)


def saturated_linear_problem(n: int = 200) -> tuple[robusteval.JointModel, Tensor, Tensor, Tensor]:
    """`linear_problem` with its logits ×1e4: the same decisions and distances, a blind cross-entropy."""
    model, x, y, distance = linear_problem(n=n)
    scaled = robusteval.wrap(Scaled(model.module, 1e4), num_classes=2, input_shape=SHAPE, name="linear-x1e4")
    return scaled, x, y, distance


class TinyEnergy(robusteval.JointModel):
    """A small nonlinear classifier read as an EBM (JEM's view): E(x) = −logsumexp f(x)."""

    capabilities = frozenset({"logits", "energy"})

    def __init__(self, num_classes: int = 3, hidden: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        dim = SHAPE[0] * SHAPE[1] * SHAPE[2]
        self.name = "tiny-energy"
        self.num_classes = num_classes
        self.input_shape = SHAPE
        self.w1 = nn.Parameter(torch.randn(dim, hidden, generator=g) / dim**0.5 * 3)
        self.w2 = nn.Parameter(torch.randn(hidden, num_classes, generator=g))

    def _logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        return torch.tanh((x.flatten(1) - 0.5) @ self.w1) @ self.w2 * 3

    def _energy(self, x: Tensor, sigma: Tensor) -> Tensor:
        return -self._logits(x, sigma).logsumexp(1)


def round_to_levels(x: Tensor, levels: int) -> Tensor:
    """Bit-depth reduction: pixels to multiples of 1/levels (torch.round: half to even), as `Rounded` does."""
    return torch.round(x * levels) / levels


def rounded_linear_robust(weight: Tensor, bias: Tensor, x: Tensor, y: Tensor, eps: float, levels: int) -> Tensor:
    """(n,) bool: the exact L∞ robustness at `eps` of argmax(W·q(x) + b) with q = `round_to_levels`.

    For each other class j, the margin (W_y − W_j)·q(x') + b_y − b_j is a sum of one term per pixel, and q is
    non-decreasing, so its minimum over the box [x − ε, x + ε] ∩ [0, 1] takes each pixel to the end that its
    weight difference prefers. A point is robust when every such minimum is positive (argmax breaks a tie
    towards the smaller class index; ties do not occur with these random weights).
    """
    flat = x.flatten(1)
    low = round_to_levels((flat - eps).clamp(0, 1), levels)
    high = round_to_levels((flat + eps).clamp(0, 1), levels)
    difference = weight[y].unsqueeze(1) - weight.unsqueeze(0)  # (n, K, d)
    worst = torch.where(difference > 0, low.unsqueeze(1), high.unsqueeze(1))
    margin = (difference * worst).sum(2) + bias[y].unsqueeze(1) - bias.unsqueeze(0)
    own = torch.nn.functional.one_hot(y, weight.shape[0]).bool()
    return (margin.masked_fill(own, float("inf")) > 0).all(1)


def rounded_linear_problem(n: int = 200, classes: int = 2, levels: int = 4, seed: int = 0,
                           shape: tuple[int, int, int] = SHAPE) -> tuple[LinearMulti, Tensor, Tensor]:
    """A K-class linear classifier and points labelled by it behind `levels`-level rounding (all correct)."""
    g = torch.Generator().manual_seed(seed)
    dim = shape[0] * shape[1] * shape[2]
    weight = torch.randn(classes, dim, generator=g)
    x = torch.rand(n, dim, generator=g)
    logits = round_to_levels(x, levels) @ weight.t()
    bias = -logits.median(0).values  # every class gets points
    y = (logits + bias).argmax(1)
    return LinearMulti(weight, bias), x.view(n, *shape), y
