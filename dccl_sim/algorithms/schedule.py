"""Per-device minibatch schedules, laid out so that K devices train in lock-step as one computation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
    the shuffle of device m is drawn from `seeded_generator(*keys[m])` (e.g. (seed, round, device id))."""
    counts = (ends - starts).astype(np.int64)
    samples, steps, devices = [], [], []
    for row, (start, count) in enumerate(zip(starts, counts, strict=True)):
        if count == 0:
            continue
        rng = seeded_generator(*keys[row])
        order = np.concatenate([rng.permutation(count) for _ in range(epochs)]) + start
        batches_per_epoch = -(-count // batch_size)
        position = np.arange(count)
        step = (np.arange(epochs)[:, None] * batches_per_epoch + position[None, :] // batch_size).ravel()
        samples.append(order)
        steps.append(step)
        devices.append(np.full(len(order), row, dtype=np.int64))
    if not samples:
        return Schedule(np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    sample, step, device = np.concatenate(samples), np.concatenate(steps), np.concatenate(devices)
    order = np.argsort(step, kind="stable")
    step_start = np.searchsorted(step[order], np.arange(step.max() + 2))
    return Schedule(step_start=step_start, sample=sample[order], device=device[order])
