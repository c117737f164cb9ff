"""How devices are packed into actors: contiguous id ranges, so each pack reads only its own Parquet shards."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np

from dccl_sim.config import RuntimeConfig


def num_packs(num_devices: int, config: RuntimeConfig, cpus: int) -> int:
    """`devices_per_actor = 1`: one actor per device; `auto`: `num_actors`, else about one actor per CPU."""
    if config.devices_per_actor == "auto":
        wanted = config.num_actors or cpus
    else:
        wanted = -(-num_devices // config.devices_per_actor)
        if config.num_actors is not None and config.num_actors != wanted:
            raise ValueError(
                f"runtime.num_actors = {config.num_actors} contradicts devices_per_actor = {config.devices_per_actor} "
                f"for {num_devices} devices ({wanted} actors); set only one of them"
            )
    return max(1, min(num_devices, wanted))


def plan_packs(num_devices: int, config: RuntimeConfig, cpus: int, work: np.ndarray | None = None) -> list[np.ndarray]:
    """Split device ids 0..N-1 into contiguous packs: of nearly equal total `work` (each device's, e.g. the samples
    it holds) where given and `devices_per_actor` is `auto`, else of nearly equal size. A round's device phase lasts
    as long as its slowest pack, and devices differ in work (ML-100K's users by tens of times)."""
    packs = num_packs(num_devices, config, cpus)
    if work is None or config.devices_per_actor != "auto" or packs == 1 or float(np.sum(work)) <= 0:
        return [np.asarray(p, dtype=np.int64) for p in np.array_split(np.arange(num_devices), packs)]
    total = np.cumsum(np.asarray(work, dtype=np.float64))
    cuts = [0]
    for i in range(1, packs):
        # the cut whose prefix of work is nearest i/packs of the whole, leaving every pack at least one device
        k = int(np.searchsorted(total, total[-1] * i / packs))
        if k > 0 and total[-1] * i / packs - total[k - 1] < total[k] - total[-1] * i / packs:
            k -= 1
        cuts.append(min(max(k + 1, cuts[-1] + 1), num_devices - (packs - i)))
    cuts.append(num_devices)
    return [np.arange(lo, hi, dtype=np.int64) for lo, hi in pairwise(cuts)]


def pack_cpus(free: list[float], packs: int) -> float:
    """The CPUs each of `packs` equal packs reserves: the most, up to an even share of all `free` CPUs, with which
    the nodes (their free CPUs in `free`) still hold every pack, so that no pack waits for a node that never frees
    up (an even share of 3 CPUs over nodes with 1 and 2 free is 1.5, which fits one pack only)."""
    share = sum(free) / packs
    fits = [
        r
        for r in {f / k for f in free for k in range(1, packs + 1) if f > 0} | {share}
        if r <= share and sum(math.floor(f / r + 1e-9) for f in free) >= packs
    ]
    return max(fits) if fits else share


def chunk_bounds(samples_per_device: np.ndarray, config: RuntimeConfig) -> list[tuple[int, int]]:
    """[lo, hi) runs of consecutive devices, each at most `chunk_devices` devices and, past its first device, at
    most `chunk_samples` samples: a pack trains one run at a time."""
    ends = np.cumsum(samples_per_device)
    bounds, lo = [], 0
    while lo < len(ends):
        before = int(ends[lo - 1]) if lo else 0
        hi = max(lo + 1, int(np.searchsorted(ends, before + config.chunk_samples, side="right")))
        hi = min(hi, lo + config.chunk_devices)
        bounds.append((lo, hi))
        lo = hi
    return bounds
