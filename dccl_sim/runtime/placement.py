"""How devices are packed into actors: contiguous id ranges, so each pack reads only its own Parquet shards."""

from __future__ import annotations

import math

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


def plan_packs(num_devices: int, config: RuntimeConfig, cpus: int) -> list[np.ndarray]:
    """Split device ids 0..N-1 into contiguous, nearly equal packs."""
    return [
        np.asarray(p, dtype=np.int64)
        for p in np.array_split(np.arange(num_devices), num_packs(num_devices, config, cpus))
    ]


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
