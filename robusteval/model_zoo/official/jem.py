"""JEM's official CIFAR model (wgrathwohl/JEM `train_wrn_ebm.py`, class `CCF`) under the JointModel contract.

`CCF` holds `f` (the Wide ResNet of `wideresnet.py`), `energy_output`
(Linear(64k, 1), trained only by JEM's unconditional variant, unused by
`CCF`) and `class_output` (Linear(64k, classes)). Inputs are normalised as
JEM's data pipeline does, (x − 0.5)/0.5. The training script saves
`{"model_state_dict": CCF.state_dict(), "replay_buffer": (N, 3, 32, 32)}`
with the buffer's images in that [−1, 1] scale.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from robusteval.core.checkpoints import BATCHNORM_STEPS, load_into
from robusteval.core.interface import JointModel
from robusteval.data import DatasetInfo
from robusteval.model_zoo.official.common import (
    ReplayImages,
    official_state_dict,
    read_official_file,
    require_classes,
    require_dataset,
)
from robusteval.model_zoo.official.wideresnet import WideResNet, wrn_size
from robusteval.training.sgld import SGLDConfig, sgld, uniform_noise

DATASETS = ("cifar10", "cifar100")
FORMAT = ("JEM's CCF checkpoint ({'model_state_dict': {f.*, energy_output.*, class_output.*}, 'replay_buffer': "
          "(N, 3, 32, 32)} or that state dict alone)")
# JEM's sample_q: 20 steps of x += 1·∇f + 0.01·n on [-1, 1] images, i.e. α = 1/4, s = 0.005 on [0, 1] ones.
JEM_SGLD = SGLDConfig(steps=20, step_size=0.25, noise=0.005)


class OfficialJEM(JointModel):
    """JEM's `CCF`: logits = class_output(f((x − 0.5)/0.5)), energy = −logsumexp(logits)."""

    capabilities = frozenset({"logits", "energy", "sample"})

    def __init__(self, info: DatasetInfo, depth: int = 28, widen_factor: int = 10, linear_outputs: int | None = 10):
        super().__init__()
        self.num_classes = info.num_classes
        self.input_shape = (3, 32, 32)
        self.f = WideResNet(depth, widen_factor, linear_outputs)
        self.energy_output = nn.Linear(self.f.last_dim, 1)
        self.class_output = nn.Linear(self.f.last_dim, info.num_classes)
        # The file's persistent chains, kept on the CPU (not a buffer: not part of the weights), read when sampled.
        self.replay_source: ReplayImages | None = None
        self.sample_config = JEM_SGLD

    @property
    def replay_buffer(self) -> Tensor | None:
        """The file's replay buffer in [0, 1] (None without one); reading it checks that it is finite."""
        return self.replay_source.images() if self.replay_source is not None else None

    def _logits(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.class_output(self.f((x - 0.5) / 0.5))

    def _energy(self, x: Tensor, sigma: Tensor) -> Tensor:
        return -torch.logsumexp(self._logits(x, sigma), dim=1)

    def _sample(self, n: int, y: Tensor | None, generator: torch.Generator | None) -> Tensor:
        start = self._chain_starts(n, y, generator).to(self.device)
        zero = torch.zeros(n, device=self.device)
        if y is None:
            return sgld(lambda v: self._energy(v, zero), start, self.sample_config, generator)
        return sgld(lambda v: -self._logits(v, zero).gather(1, y.view(-1, 1)).squeeze(1), start,
                    self.sample_config, generator)

    def _chain_starts(self, n: int, y: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """Chains start from the file's replay buffer (official `cond_samples`: the buffer images the model
        classifies as y), else from uniform noise."""
        buffer = self.replay_buffer
        if buffer is None:
            return uniform_noise(n, self.input_shape, generator)
        if y is None:
            return buffer[torch.randint(0, len(buffer), (n,), generator=generator)].clone()
        predicted = self._buffer_classes()
        starts = []
        for label in y.cpu().tolist():
            pool = (predicted == label).nonzero().flatten()
            if len(pool) == 0:  # no buffer image of this class: any image
                pool = torch.arange(len(buffer))
            starts.append(buffer[pool[torch.randint(0, len(pool), (1,), generator=generator)]])
        return torch.cat(starts).clone()


    def _buffer_classes(self) -> Tensor:
        """The model's class for every buffer image, computed once per buffer (a full pass over it)."""
        buffer = self.replay_buffer
        assert buffer is not None
        cached = getattr(self, "_buffer_predictions", None)
        if cached is None or cached[0] is not buffer:
            with torch.no_grad():
                predicted = torch.cat([
                    self._logits(chunk.to(self.device), torch.zeros(len(chunk), device=self.device)).argmax(1).cpu()
                    for chunk in buffer.split(500)
                ])
            self._buffer_predictions = (buffer, predicted)
        return self._buffer_predictions[1]


def build_jem(info: DatasetInfo) -> OfficialJEM:
    """The published configuration, WRN-28-10, with random weights."""
    require_dataset("JEM", info, DATASETS)
    return OfficialJEM(info)


def load_jem(info: DatasetInfo, path: str | Path, allow_unsafe_pickle: bool = False) -> OfficialJEM:
    """JEM's file as the official code writes it; the WRN's depth and width are read from its shapes."""
    require_dataset("JEM", info, DATASETS)
    loaded = read_official_file(path, allow_unsafe_pickle, FORMAT)
    state = official_state_dict(loaded, path, FORMAT)
    if "class_output.weight" not in state or "f.layer1.0.conv1.weight" not in state:
        # Not sizable: name the keys that differ from the published configuration (built without memory).
        with torch.device("meta"):
            published = OfficialJEM(info)
        load_into(published, state, str(path), FORMAT, optional=BATCHNORM_STEPS)
    require_classes(path, "class_output", int(state["class_output.weight"].shape[0]), info)
    depth, widen_factor, linear_outputs = wrn_size(state)
    model = OfficialJEM(info, depth, widen_factor, linear_outputs)
    load_into(model, state, str(path), FORMAT, optional=BATCHNORM_STEPS)
    if loaded.get("replay_buffer") is not None:
        model.replay_source = ReplayImages(loaded["replay_buffer"], path, model.input_shape)
    return model.eval()  # as create_model: a direct caller must not get BatchNorm on batch statistics
