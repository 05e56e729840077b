"""What autograd keeps alive for a backward pass: the bytes of saved tensors, counted by saved_tensors_hooks.

`SavedTensorBytes` is used as `with torch.autograd.graph.saved_tensors_hooks(c.pack, c.unpack):` around a
forward and backward pass; `peak` is then the most bytes of distinct storages held for the backward at once.
Tensors saved while the backward pass runs (a checkpointed step recomputed) are counted too when the backward
runs inside the block. It measures activations, not the allocator: on CUDA use torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

from torch import Tensor


class SavedTensorBytes:
    """Live and peak bytes of the distinct storages that saved tensors refer to."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage address -> [saved tensors using it, its bytes]

    def pack(self, tensor: Tensor) -> _Held:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        entry = self._refs.setdefault(key, [0, storage.nbytes()])
        if entry[0] == 0:
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        return _Held(self, key, tensor)

    @staticmethod
    def unpack(held: _Held) -> Tensor:
        return held.tensor

    def released(self, key: int) -> None:
        entry = self._refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]


class _Held:
    """A saved tensor; autograd drops it when the graph node that saved it is freed."""

    def __init__(self, counter: SavedTensorBytes, key: int, tensor: Tensor):
        self.counter, self.key, self.tensor = counter, key, tensor

    def __del__(self) -> None:
        self.counter.released(self.key)
