"""Every random draw in a run comes from a generator derived from integer keys, never from process state."""

from __future__ import annotations

import numpy as np


def seeded_generator(*keys: int) -> np.random.Generator:
    """A NumPy generator derived from integer keys such as (seed, round, device id), never from process state."""
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]))
