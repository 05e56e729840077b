"""Seeds of the attack engine: every random draw has its own key (seed, stream, batch, ε, ...).

So a batch's draws depend on the run's seed and the batch only, and a resumed
run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np

# The streams of random draws.
CLEAN, GRADIENT, RECHECK, ATTACK, VERIFY, MINIMIZE, CHECKS = range(7)
# Added with the adaptive stages (new numbers, so the streams above draw exactly what they drew before).
REMEDY, WORST_OF_N = 7, 8
# Batches of the large-ε check are numbered from here, apart from the run's own batches.
LARGE_EPS_BATCH_OFFSET = 1_000_000
# Escalation round r of the large-ε check numbers its batches from LARGE_EPS_BATCH_OFFSET * (r + 1).


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from integers (numpy's SeedSequence), independent of anything run before."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint32)[0])


def attack_seed(seed: int, batch: int, eps_index: int, variant: int = 0) -> int:
    """The seed the engine gives every component of an attack at (batch, ε index, gradient variant).

    All members of a suite share it, as AutoAttack's own loop does.
    """
    return derive_seed(seed, ATTACK, batch, eps_index, variant)
