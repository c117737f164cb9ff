"""The deployment latency model (docs/design.md §6), as FedScale does it.

Every device gets a profile — compute speed (FLOP/s), down and up bandwidth (bytes/s), availability — drawn
log-normally around the configured medians from (seed, device id) alone, so a device keeps its profile
whatever the placement. Device time = download bytes / down + training FLOPs / speed + upload bytes / up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dccl_sim.config import LatencyConfig


@dataclass(frozen=True)
class DeviceProfiles:
    flops: np.ndarray
    down_bps: np.ndarray
    up_bps: np.ndarray
    available: np.ndarray  # bool

    def subset(self, ids: np.ndarray) -> DeviceProfiles:
        """The profiles of the devices `ids`."""
        return DeviceProfiles(self.flops[ids], self.down_bps[ids], self.up_bps[ids], self.available[ids])


def draw_profiles(config: LatencyConfig, seed: int, device_ids: np.ndarray, round_index: int = 0) -> DeviceProfiles:
    """Profiles of the given devices; availability is redrawn each round, speeds are fixed per device."""
    device_ids = np.asarray(device_ids, dtype=np.uint64)
    normals = _hashed_normals(seed, device_ids, 3)
    uniform = _hashed_uniform(seed * 1_000_003 + round_index + 1, device_ids)
    return DeviceProfiles(
        flops=config.compute_flops_median * np.exp(config.compute_flops_sigma * normals[0]),
        down_bps=config.down_bps_median * np.exp(config.bandwidth_sigma * normals[1]),
        up_bps=config.up_bps_median * np.exp(config.bandwidth_sigma * normals[2]),
        available=uniform < config.availability,
    )


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64: a counter-based hash, so draws depend on (seed, device) and nothing else."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hashed_uniform(key: int, device_ids: np.ndarray, stream: int = 0) -> np.ndarray:
    with np.errstate(over="ignore"):
        mixed = _splitmix(device_ids * np.uint64(0x100000001B3) + np.uint64((key * 31 + stream) & 0xFFFFFFFFFFFF))
    return ((mixed >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def _hashed_normals(seed: int, device_ids: np.ndarray, count: int) -> np.ndarray:
    """Standard normals by Box–Muller from hashed uniforms."""
    out = []
    for stream in range(count):
        u1 = _hashed_uniform(seed, device_ids, 2 * stream + 1)
        u2 = _hashed_uniform(seed, device_ids, 2 * stream + 2)
        out.append(np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2))
    return np.stack(out)


def device_times(
    profiles: DeviceProfiles,
    flops: np.ndarray,
    download_bytes: np.ndarray | int,
    upload_bytes: int,
) -> np.ndarray:
    """Modelled seconds per device: download, local compute, upload."""
    return download_bytes / profiles.down_bps + flops / profiles.flops + upload_bytes / profiles.up_bps
