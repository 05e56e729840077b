"""Fingerprints of what a run's figures depend on: the model's weights and the files given beside them.

A run directory records them in its config.json (`model_fingerprint`, and `file_fingerprints` when files were
given), so resume and merge can refuse records computed with other weights behind the same path. Every kind of
run (attack, certify, predict, denoise) uses these functions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch

from robusteval.core.checkpoints import sha256_of

# Shown in reports where two runs of one model name differ in their weights.
SHORT = 8
_CHUNK = 1 << 20


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A 16-hex hash of the model's state dict (names and bytes, in name order): equal weights, equal hash."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def file_fingerprint(path: str | Path) -> str:
    """A 16-hex sha256 prefix of a file's bytes."""
    return sha256_of(path)[:16]


def files_fingerprints(files: Mapping[str, str | Path | None]) -> dict[str, str]:
    """{option: fingerprint} of the given files (options whose value is None are left out)."""
    return {option: file_fingerprint(path) for option, path in files.items()
            if path is not None and Path(path).is_file()}


def short(fingerprint: str) -> str:
    """The fingerprint as reports show it."""
    return fingerprint[:SHORT]
