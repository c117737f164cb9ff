"""Per-device minibatch schedules: every device's own seeded shuffle, trained in lock-step."""

from __future__ import annotations

import numpy as np
import pytest

from dccl_sim.algorithms.schedule import minibatch_schedule
from dccl_sim.seeding import seeded_generator


def reference_steps(starts, ends, epochs: int, batch_size: int, keys) -> list[list[tuple[int, int]]]:
    """The definition, one device at a time: step s holds (device, sample) for each device's s-th minibatch,
    devices in order."""
    per_device = {}
    for row, (start, end) in enumerate(zip(starts, ends, strict=True)):
        if end == start:
            continue
        rng = seeded_generator(*keys[row])
        batches = []
        for _ in range(epochs):
            order = rng.permutation(end - start) + start
            batches += [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        per_device[row] = batches
    num_steps = max((len(b) for b in per_device.values()), default=0)
    return [
        [(row, int(sample)) for row, batches in per_device.items() if s < len(batches) for sample in batches[s]]
        for s in range(num_steps)
    ]


@pytest.mark.parametrize(("epochs", "batch_size"), [(1, 4), (2, 3), (3, 32)])
def test_schedule_is_each_devices_own_seeded_minibatches_in_lock_step(epochs: int, batch_size: int) -> None:
    counts = np.random.default_rng(0).integers(0, 12, 40)
    counts[::5] = 0  # devices without samples take no step
    ends = np.cumsum(counts) + 7  # samples need not start at 0
    starts = ends - counts
    keys = [(0, 3, 1000 + row, 1) for row in range(len(counts))]
    schedule = minibatch_schedule(starts, ends, epochs, batch_size, keys)
    expected = reference_steps(starts, ends, epochs, batch_size, keys)
    assert schedule.num_steps == len(expected)
    for s, entries in enumerate(expected):
        samples, devices = schedule.step(s)
        assert list(zip(devices.tolist(), samples.tolist(), strict=True)) == entries


def test_a_schedule_without_samples_has_no_steps() -> None:
    schedule = minibatch_schedule(np.array([3, 5]), np.array([3, 5]), 2, 4, [(0,), (1,)])
    assert schedule.num_steps == 0 and len(schedule.sample) == 0
