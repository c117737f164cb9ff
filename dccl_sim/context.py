"""The round context: everything a strategy's steps may depend on, in one frozen value passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dccl_sim.seeding import seeded_generator, stream_tag

if TYPE_CHECKING:
    from dccl_sim.config import SimConfig


@dataclass(frozen=True)
class RoundContext:
    """Round `round` of a run: its config, the sorted participant ids, and its named random streams.

    Every draw comes from `(seed, round, *ids, tag of the stream)` (`keys`, `rng`), never from the process,
    actor or placement that makes it, so results do not depend on where a device is simulated."""

    config: SimConfig
    round: int
    participants: np.ndarray

    @property
    def seed(self) -> int:
        return self.config.seed

    def keys(self, stream: str, *ids: int) -> tuple[int, ...]:
        """Seed keys of a round stream, e.g. `keys("cloud_minibatches")` or `keys("patch_trial", device_id)`."""
        return (self.seed, self.round, *(int(i) for i in ids), stream_tag(stream))

    def device_keys(self, stream: str, device_ids: np.ndarray) -> list[tuple[int, ...]]:
        """One key tuple per device: each device's own draws of the stream."""
        return [self.keys(stream, int(d)) for d in device_ids]

    def rng(self, stream: str, *ids: int) -> np.random.Generator:
        return seeded_generator(*self.keys(stream, *ids))
