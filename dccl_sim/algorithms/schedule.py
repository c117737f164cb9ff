"""Per-device minibatch schedules, laid out so that K devices train in lock-step as one computation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dccl_sim.data.device_data import index_ranges
from dccl_sim.seeding import seeded_generator


@dataclass(frozen=True)
class Schedule:
    """Step s trains, for every device still running, its s-th minibatch.

    `sample[step_start[s]:step_start[s + 1]]` are the sample indices of step s and `device` their device rows;
    each device's own sequence of minibatches depends only on its seed keys, never on the other devices.
    """

    step_start: np.ndarray  # [num_steps + 1]
    sample: np.ndarray  # [E * S] flat sample indices, grouped by step then device
    device: np.ndarray  # [E * S] device row of each entry

    @property
    def num_steps(self) -> int:
        return len(self.step_start) - 1

    def step(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.step_start[s], self.step_start[s + 1]
        return self.sample[lo:hi], self.device[lo:hi]


def minibatch_schedule(
    starts: np.ndarray, ends: np.ndarray, epochs: int, batch_size: int, keys: list[tuple[int, ...]]
) -> Schedule:
    """Device m trains samples [starts[m], ends[m]) for `epochs` shuffled passes in minibatches of `batch_size`;
    the shuffle of device m is drawn from `seeded_generator(*keys[m])` (e.g. (seed, round, device id)).

    Only the draws loop over devices (one generator each, ~10 µs); the layout around them is whole-array."""
    counts = (np.asarray(ends) - np.asarray(starts)).astype(np.int64)
    rows = np.flatnonzero(counts > 0)
    if len(rows) == 0:
        return Schedule(np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    counts = counts[rows]
    # entries are laid out device by device, each device's epochs one after another
    sample = np.empty(int(counts.sum()) * epochs, dtype=np.int64)
    at = 0
    for row, count in zip(rows.tolist(), counts.tolist(), strict=True):
        rng = seeded_generator(*keys[row])
        for _ in range(epochs):
            sample[at : at + count] = rng.permutation(count)
            at += count
    lengths = counts * epochs
    device = np.repeat(rows, lengths)
    offset = index_ranges(np.zeros_like(lengths), lengths)  # epoch * count + position within the epoch
    count_of = np.repeat(counts, lengths)
    epoch, position = offset // count_of, offset % count_of
    sample += np.repeat(np.asarray(starts, dtype=np.int64)[rows], lengths)
    step = epoch * -(-count_of // batch_size) + position // batch_size
    order = np.argsort(step, kind="stable")
    step_start = np.searchsorted(step[order], np.arange(step.max() + 2))
    return Schedule(step_start=step_start, sample=sample[order], device=device[order])
