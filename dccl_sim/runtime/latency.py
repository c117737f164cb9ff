"""The deployment latency model (DESIGN.md §6), as FedScale does it.

Every device gets a profile — compute speed (FLOP/s), down and up bandwidth (bytes/s), availability — drawn
log-normally around the configured medians from (seed, device id) alone, so a device keeps its profile
whatever the placement. Device time = download bytes / down + training FLOPs / speed + upload bytes / up.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from dccl_sim.config import LatencyConfig, SimConfig

_FLOAT_BYTES = 4


@dataclass(frozen=True)
class DeviceProfiles:
    flops: np.ndarray
    down_bps: np.ndarray
    up_bps: np.ndarray
    available: np.ndarray  # bool


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


def flops_per_sample(config: SimConfig, num_profile_fields: int) -> dict[str, float]:
    """Forward FLOPs of one sample: DIN features (attention over L positions), the top MLP, the patches; for CoDA
    also a candidate's first hidden layer (it arrives as x) and one row of the sample classifier."""
    d, L = config.model.embed_dim, config.data.history_len
    attention = [4 * d, *config.model.attention_hidden, 1]
    features = L * sum(2 * a * b for a, b in itertools.pairwise(attention)) + 4 * L * d
    mlp = [3 * d + config.model.profile_dim * num_profile_fields, *config.model.mlp_hidden, 1]
    head = sum(2 * a * b for a, b in itertools.pairwise(mlp))
    r, k = config.patch.rank, config.patch.k
    patch = sum(2 * h * r + 2 * r * k * h for h in config.model.mlp_hidden)
    trained = {"fedavg": features + head, "local_finetune": head, "cloud_only": 0}.get(config.strategy, head + patch)
    return {
        "features": float(features),
        "head": float(head),
        "patch": float(patch),
        "train": float(trained),
        "first_hidden": float(2 * mlp[0] * mlp[1]),
        "classifier": float(2 * 3 * d),  # a dot product over the behaviour block of x
    }


def candidate_bytes(config: SimConfig, num_profile_fields: int) -> int:
    """Bytes of one CoDA candidate on the wire: its top-MLP input x in the configured dtype and a one-byte label."""
    input_dim = 3 * config.model.embed_dim + config.model.profile_dim * num_profile_fields
    return input_dim * np.dtype(config.coda.feature_dtype).itemsize + 1


def planned_augmentation(config: SimConfig, n_local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(candidates, classifier passes) per device before it trains: CoDA's upper bounds (S candidates each, all of
    them through the classifier with the local samples for every step); zeros for the other strategies."""
    if config.strategy != "coda":
        return np.zeros_like(n_local), np.zeros_like(n_local)
    candidates = np.full_like(n_local, config.coda.candidates)
    steps = config.coda.classifier_steps if config.coda.filter == "classifier" else 0
    return candidates, (n_local + candidates) * steps


def planned_samples_trained(config: SimConfig, n_local: np.ndarray) -> np.ndarray:
    """Samples a device will pass through training this round, known before it trains: an upper bound for gated
    MetaPatch (the trial run on the older part plus a full refit) and for CoDA (every candidate kept), exact for
    the others."""
    epochs = config.device.local_epochs
    if config.strategy in ("metapatch", "dccl", "coda"):
        factor = (2.0 - config.device.gate_frac) if config.device.gate else 1.0
        held = n_local + (config.coda.candidates if config.strategy == "coda" else 0)
        return np.ceil(held * epochs * factor).astype(np.int64)
    if config.strategy in ("fedavg", "local_finetune"):
        return n_local * epochs
    return np.zeros_like(n_local)


def device_flops(
    flops: dict[str, float],
    samples_trained: np.ndarray,
    n_local: np.ndarray,
    n_eval: np.ndarray,
    n_candidates: np.ndarray | int = 0,
    classifier_passes: np.ndarray | int = 0,
) -> np.ndarray:
    """Training (forward + backward ≈ 3× forward) plus computing local features and evaluating once; for CoDA the
    candidates' first hidden layer and the sample classifier's training (3× a forward row per pass)."""
    coda = n_candidates * flops["first_hidden"] + classifier_passes * 3.0 * flops["classifier"]
    return samples_trained * 3.0 * flops["train"] + (n_local + n_eval) * flops["features"] + coda


def transfer_bytes(strategy: str, model_floats: int, patch_floats: int, k: int) -> tuple[int, int]:
    """(download, upload) bytes per participating device per round."""
    download = model_floats * _FLOAT_BYTES
    if strategy in ("metapatch", "dccl", "coda"):
        download += patch_floats * _FLOAT_BYTES + (k * _FLOAT_BYTES if strategy == "dccl" else 0)
        return download, k * _FLOAT_BYTES
    if strategy == "fedavg":
        return download, model_floats * _FLOAT_BYTES
    return download, 0


def device_times(
    profiles: DeviceProfiles,
    flops: np.ndarray,
    download_bytes: np.ndarray | int,
    upload_bytes: int,
) -> np.ndarray:
    """Modelled seconds per device: download, local compute, upload."""
    return download_bytes / profiles.down_bps + flops / profiles.flops + upload_bytes / profiles.up_bps


def modelled_round_latency(
    times: np.ndarray, deadline_s: float | None, cloud_flops: float, config: LatencyConfig
) -> tuple[float, np.ndarray]:
    """(round latency, straggler mask): the last device to finish within the deadline, plus the cloud's time."""
    stragglers = times > deadline_s if deadline_s is not None else np.zeros(len(times), dtype=bool)
    finished = times[~stragglers]
    device_phase = float(finished.max()) if len(finished) else float(deadline_s or 0.0)
    return device_phase + cloud_flops / config.cloud_flops, stragglers
