"""The JointModel contract every model in robusteval keeps.

A JointModel classifies, and may also denoise, score (energy) or sample.
Clean inputs are float tensors in [0, 1], NCHW. A noisy input at noise level
σ > 0 is x0 + σ·n and may leave [0, 1]. σ is the standard deviation of
additive Gaussian noise in that [0, 1] pixel scale: a float or a (B,) tensor.

Subclasses implement the underscore methods (`_logits`, `_denoise`,
`_energy`, `_sample`) and receive validated input with σ as a (B,) tensor;
the public methods validate and check capabilities.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from robusteval.core.errors import UsageError
from robusteval.core.straight_through import backward_through

CAPABILITIES = frozenset({"logits", "denoise", "energy", "sample"})

# Values this far outside [0, 1] are tolerated at σ = 0 (float round-off from
# attacks and normalisation).
RANGE_TOLERANCE = 1e-5

_validation_enabled = True


class CapabilityError(UsageError, NotImplementedError):
    """Raised when a model is asked for something it does not compute."""

    def __init__(self, model_name: str, capability: str, capabilities: frozenset[str]):
        have = ", ".join(sorted(capabilities)) or "none"
        super().__init__(
            f"model '{model_name}' does not have the capability '{capability}' "
            f"(it has: {have})"
        )
        self.model_name = model_name
        self.capability = capability


@contextlib.contextmanager
def trusted_inputs() -> Iterator[None]:
    """Skip per-call input validation inside this block.

    Engines validate a data set once and then call the model thousands of
    times on inputs they construct themselves; the finite/range checks would
    cost a host synchronisation on every call.
    """
    global _validation_enabled
    previous = _validation_enabled
    _validation_enabled = False
    try:
        yield
    finally:
        _validation_enabled = previous


class NonFiniteLogits(UsageError, ArithmeticError):
    """A model answered NaN or ±Inf logits during a run: its decisions (argmax of NaN) would mean nothing."""


def non_finite_message(model_name: str, where: str) -> str:
    return (f"model {model_name} gave non-finite logits (NaN or Inf) {where}; its predictions would be "
            f"meaningless, so the run stops (check its weights and --model-config)")


def require_finite_logits(logits: Tensor, model_name: str, where: str) -> None:
    """Stop a run (NonFiniteLogits, one line naming the model) when `logits` hold NaN or ±Inf."""
    if not bool(torch.isfinite(logits.detach()).all()):
        raise NonFiniteLogits(non_finite_message(model_name, where))


def finite_argmax(logits: Tensor) -> Tensor:
    """argmax per row, or -1 for a row with a NaN or ±Inf logit: no device sync, so engines can check later."""
    return torch.where(torch.isfinite(logits).all(1), logits.argmax(1), torch.full_like(logits[:, 0], -1,
                                                                                         dtype=torch.long))


def validate_images(
    x: Tensor, input_shape: tuple[int, ...], noisy: Tensor | None = None, what: str = "x"
) -> None:
    """Check that `x` is a float (B, *input_shape) batch of finite values.

    `noisy` is a (B,) boolean tensor marking rows that carry Gaussian noise;
    the other rows must lie in [0, 1]. With `noisy=None` every row must.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise UsageError(f"{what} must be a floating-point tensor with values in [0, 1], got dtype {x.dtype}")
    expected = (x.shape[0] if x.dim() > 0 else "B", *input_shape)
    if x.dim() != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape):
        raise UsageError(
            f"{what} must have shape (B, {', '.join(map(str, input_shape))}) (NCHW), "
            f"got {tuple(x.shape)}; expected {expected}"
        )
    if x.shape[0] == 0:
        return
    values = x.detach()
    if not bool(torch.isfinite(values).all()):
        raise UsageError(f"{what} contains NaN or inf values")
    clean_rows = values if noisy is None else values[~noisy]
    if clean_rows.numel():
        low, high = float(clean_rows.min()), float(clean_rows.max())
        if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
            raise UsageError(
                f"{what} must lie in [0, 1] at sigma = 0 (got min {low:.4g}, max {high:.4g}); "
                f"normalisation happens inside the model"
            )


def as_sigma(sigma: float | Tensor, x: Tensor) -> Tensor:
    """Return σ as a (B,) tensor on x's device and dtype; reject negative or non-finite σ."""
    batch = x.shape[0]
    if isinstance(sigma, Tensor):
        s = sigma.to(device=x.device, dtype=x.dtype)
        if s.dim() == 0:
            s = s.expand(batch)
        if s.shape != (batch,):
            raise UsageError(f"sigma must be a float or a tensor of shape ({batch},), got {tuple(s.shape)}")
    else:
        s = torch.full((batch,), float(sigma), device=x.device, dtype=x.dtype)
    if _validation_enabled and batch and not bool(torch.isfinite(s).all() & (s >= 0).all()):
        raise UsageError(f"sigma must be finite and >= 0, got {sigma}")
    return s


class JointModel(nn.Module):
    """Base class for every model robusteval evaluates.

    Attributes set by subclasses:
        name: registry name, used in messages.
        num_classes: number of classes.
        input_shape: (C, H, W) of one input image.
        capabilities: subset of {"logits", "denoise", "energy", "sample"}.
        stochastic_inference: True when a forward pass draws randomness.
    """

    name: str = "model"
    num_classes: int
    input_shape: tuple[int, int, int]
    capabilities: frozenset[str] = frozenset({"logits"})
    stochastic_inference: bool = False

    # --- public, validated API -------------------------------------------------
    def logits(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """Class logits (B, num_classes) of x, which carries Gaussian noise of std σ."""
        self._require("logits")
        s = self._check(x, sigma)
        return self._logits(x, s)

    def denoise(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """E[x0 | x = x0 + σ·n]: an estimate of the clean image, same shape as x."""
        self._require("denoise")
        s = self._check(x, sigma)
        return self._denoise(x, s)

    def energy(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """−log p_σ(x) up to a constant, shape (B,)."""
        self._require("energy")
        s = self._check(x, sigma)
        return self._energy(x, s)

    def sample(self, n: int, y: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Draw n images in [0, 1] (class-conditional when y is given)."""
        self._require("sample")
        if n <= 0:
            raise UsageError(f"n must be a positive number of samples, got {n}")
        if y is not None:
            y = torch.as_tensor(y, dtype=torch.long, device=self.device)
            if y.shape != (n,) or bool(((y < 0) | (y >= self.num_classes)).any()):
                raise UsageError(f"y must be {n} class indices in [0, {self.num_classes}), got {y.tolist()}")
        return self._sample(n, y, generator)

    def forward(self, x: Tensor) -> Tensor:
        """What attacks see: logits(x, 0.0)."""
        return self.logits(x, 0.0)

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    # --- implemented by subclasses ---------------------------------------------
    def _logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        raise CapabilityError(self.name, "logits", self.capabilities)

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        raise CapabilityError(self.name, "denoise", self.capabilities)

    def _energy(self, x: Tensor, sigma: Tensor) -> Tensor:
        raise CapabilityError(self.name, "energy", self.capabilities)

    def _sample(self, n: int, y: Tensor | None, generator: torch.Generator | None) -> Tensor:
        raise CapabilityError(self.name, "sample", self.capabilities)

    # --- helpers -----------------------------------------------------------------
    def _require(self, capability: str) -> None:
        if capability not in self.capabilities:
            raise CapabilityError(self.name, capability, self.capabilities)

    def _check(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        if _validation_enabled:
            validate_images(x, self.input_shape, noisy=None if _is_zero(sigma) else _noisy_rows(sigma, x))
        return as_sigma(sigma, x)


def _is_zero(sigma: float | Tensor) -> bool:
    if isinstance(sigma, Tensor):
        return bool((sigma == 0).all())
    return float(sigma) == 0.0


def _noisy_rows(sigma: float | Tensor, x: Tensor) -> Tensor:
    if isinstance(sigma, Tensor) and sigma.dim() == 1 and sigma.shape[0] == x.shape[0]:
        return sigma.to(x.device) > 0
    return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)


# How a user's preprocessing is differentiated (`wrap(..., gradient=...)`), besides a callable stand-in.
PREPROCESS_GRADIENTS = ("exact", "bpda")


class WrappedClassifier(JointModel):
    """A plain classifier (logits out, [0, 1] images in) as a JointModel, optionally behind a preprocessing.

    It only has the `logits` capability. σ is ignored: a plain classifier is
    not told the noise level, it just sees the (possibly noisy) image.
    With `preprocess`, logits(x) = module(preprocess(x)), differentiated as
    `gradient` says (see `wrap`).
    """

    def __init__(self, module: nn.Module, num_classes: int, input_shape: tuple[int, int, int], name: str = "wrapped",
                 preprocess: Callable[[Tensor], Tensor] | None = None,
                 gradient: str | Callable[[Tensor], Tensor] = "exact", randomized: bool = False):
        super().__init__()
        if num_classes < 2:
            raise UsageError(f"num_classes must be at least 2, got {num_classes}")
        if len(input_shape) != 3 or any(int(d) <= 0 for d in input_shape):
            raise UsageError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape}")
        if preprocess is not None and not callable(preprocess):
            raise UsageError(f"preprocess must be a callable on [0, 1] image batches, got {type(preprocess).__name__}")
        if not callable(gradient) and gradient not in PREPROCESS_GRADIENTS:
            raise UsageError(f"gradient must be 'exact' (autograd), 'bpda' (identity backward) or a differentiable "
                             f"callable approximating preprocess, got {gradient!r}")
        if preprocess is None and (gradient != "exact" or randomized):
            raise UsageError("gradient and randomized describe a preprocess; none is given")
        self.module = module
        # Keep the module's mode: wrapping an eval-mode classifier must not put it in training mode.
        self.training = module.training
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(d) for d in input_shape)  # type: ignore[assignment]
        self.capabilities = frozenset({"logits"})
        self.name = name
        self.preprocess = preprocess
        self.gradient = gradient
        # A randomized preprocessing is attacked with EOT and decided by majority and worst-of-N.
        self.stochastic_inference = bool(randomized)

    def _logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        out = self.module(self._front(x))
        if out.dim() != 2 or out.shape[1] != self.num_classes:
            raise UsageError(
                f"wrapped module must return logits of shape (B, {self.num_classes}), got {tuple(out.shape)}"
            )
        return out

    def _front(self, x: Tensor) -> Tensor:
        """The preprocessed batch, with the gradient `self.gradient` names."""
        if self.preprocess is None:
            return x
        tracking = torch.is_grad_enabled() and x.requires_grad
        if self.gradient == "exact" or not tracking:
            out = self._checked(self.preprocess(x), x, "preprocess")
            # A preprocessing autograd cannot follow (numpy, PIL) has no gradient at all: say so with zeros,
            # which the engine's zero-gradient check diagnoses, rather than fail inside an attack.
            return out + 0 * x if tracking and not out.requires_grad else out
        with torch.no_grad():
            value = self._checked(self.preprocess(x.detach()), x, "preprocess")
        stand_in = self.gradient
        approximation = x if stand_in == "bpda" else self._checked(stand_in(x), x, "gradient")  # type: ignore[operator]
        return backward_through(approximation, value)

    @staticmethod
    def _checked(out: object, x: Tensor, what: str) -> Tensor:
        if not isinstance(out, Tensor) or tuple(out.shape) != tuple(x.shape):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise UsageError(f"wrap's {what} must return a tensor of the input's shape {tuple(x.shape)}, got {got}")
        return out.to(device=x.device, dtype=x.dtype)


def wrap(
    module: nn.Module, num_classes: int, input_shape: tuple[int, int, int], name: str = "wrapped", *,
    preprocess: Callable[[Tensor], Tensor] | None = None, gradient: str | Callable[[Tensor], Tensor] = "exact",
    randomized: bool = False,
) -> JointModel:
    """Turn a plain classifier, optionally behind a defense of your own, into a JointModel (capability `logits`).

    The module must take float images in [0, 1] (NCHW) and return logits;
    normalisation, if any, belongs inside it.

    `preprocess`: any callable on (B, C, H, W) batches in [0, 1] returning a batch of the same shape (JPEG
    through PIL or torchvision, bit-depth reduction, a median filter; it need not be differentiable); the
    model's logits are module(preprocess(x)). `gradient`: how attacks differentiate it: "exact" (autograd
    through it; a preprocessing autograd cannot follow has zero gradient), "bpda" (the identity on the
    backward pass, Athalye et al. 2018) or a differentiable callable g approximating it (forward
    preprocess(x), backward through g(x)). `randomized`: the preprocessing draws randomness (use torch's
    global generator, which the engine seeds per batch, ε and stage so runs resume exactly); it is then
    attacked with EOT and decided by majority and worst-of-N, as the zoo's randomized defenses. The engine's
    checks apply as to any model: "exact" through a rounding front end is flagged as having no usable gradient.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"wrap() takes a torch.nn.Module, got {type(module).__name__}")
    return WrappedClassifier(module, num_classes, input_shape, name=name, preprocess=preprocess, gradient=gradient,
                             randomized=randomized)
