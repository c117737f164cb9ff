"""The device side of a round: the local data of a pack of devices and what every strategy's step needs from it."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from dccl_sim import metrics
from dccl_sim.algorithms.cloud_steps import first_hidden_of
from dccl_sim.algorithms.metapatch_step import LocalSamples
from dccl_sim.algorithms.protocol import Broadcast, PackResult, load_numpy_state
from dccl_sim.config import SimConfig
from dccl_sim.data.device_data import (
    QUERY_POS_BITS,
    SPLIT_TEST,
    SPLIT_TRAIN,
    SPLIT_VALID,
    DeviceData,
    index_ranges,
)
from dccl_sim.models.factory import Models, ModelSpec, build_models


@dataclass(frozen=True)
class RoundSamples:
    """Sample indices of K devices for one round, grouped by device: device m owns [starts[m], ends[m])."""

    indices: np.ndarray
    starts: np.ndarray
    ends: np.ndarray


def group_by_device(data: DeviceData, device_ids: np.ndarray, mask: np.ndarray) -> RoundSamples:
    """The samples under `mask` of each device in `device_ids` (sorted), in storage (time) order."""
    # samples are stored sorted by device: each device's are one range, found by binary search, not by a pass
    # over every sample the pack holds (np.isin took 14 ms per 1,024-device chunk of a 50,000-device pack, this 1 ms)
    first = np.searchsorted(data.sample_device, device_ids, side="left")
    held = index_ranges(first, np.searchsorted(data.sample_device, device_ids, side="right") - first)
    indices = held[mask[held]]
    bounds = np.searchsorted(data.sample_device[indices], np.append(device_ids, np.iinfo(np.int64).max))
    return RoundSamples(indices, bounds[:-1], bounds[1:])


def newest_slice_starts(positions: np.ndarray, starts: np.ndarray, ends: np.ndarray, frac: float) -> np.ndarray:
    """Where each device's newest slice begins: the first of its rows whose position is at least the (1 − frac)
    quantile (numpy's "higher" method) of its positions, so samples of one query never straddle the cut.
    `positions` must be non-decreasing within each device's rows [starts[m], ends[m]); empty devices get `ends`."""
    lengths = ends - starts
    out = ends.copy()
    has = lengths > 0
    if not has.any():
        return out
    cut = positions[starts[has] + np.ceil((lengths[has] - 1) * (1.0 - frac)).astype(np.int64)]
    # one sorted key over all devices: (device row, position); searchsorted finds each cut's first row
    span = int(positions.max()) + 1
    rows = np.repeat(np.arange(len(starts), dtype=np.int64), lengths)
    key = rows * span + positions.astype(np.int64)
    out[has] = np.searchsorted(key, np.flatnonzero(has) * span + cut, side="left")
    return out


def device_eval_columns(
    data: DeviceData, samples: RoundSamples, device_ids: np.ndarray, scores: np.ndarray, k: int
) -> dict[str, np.ndarray]:
    """Per-device AUC, HR@k, NDCG@k (means over the device's queries) and counts for one model's scores."""
    idx = samples.indices
    n_devices = len(device_ids)
    columns = {
        "auc": np.full(n_devices, np.nan),
        "hr": np.full(n_devices, np.nan),
        "ndcg": np.full(n_devices, np.nan),
        "n_queries": np.zeros(n_devices, dtype=np.int64),
    }
    if len(idx) == 0:
        return columns
    label = data.label[idx]
    group = metrics.group_auc(data.sample_device[idx], label, scores)
    rows = np.searchsorted(device_ids, group.groups)
    columns["auc"][rows] = group.auc
    queries = data.query_ids(idx)
    ranks = metrics.positive_ranks(queries, label, scores)
    query_device = np.unique(queries) >> QUERY_POS_BITS
    rows = np.searchsorted(device_ids, query_device)
    count = np.bincount(rows, minlength=n_devices)
    hits = np.bincount(rows, weights=(ranks < k).astype(np.float64), minlength=n_devices)
    gains = np.bincount(rows, weights=np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0), minlength=n_devices)
    has = count > 0
    columns["hr"][has] = hits[has] / count[has]
    columns["ndcg"][has] = gains[has] / count[has]
    columns["n_queries"] = count
    return columns


class DeviceSide:
    """The devices of one pack: their local data, the broadcast models, and the step of the run's strategy."""

    def __init__(self, config: SimConfig, spec: ModelSpec, data: DeviceData) -> None:
        self.config = config
        self.spec = spec
        self.data = data
        self.window = data.windows(config.data.windows, config.data.pretrain_frac)
        eval_split = SPLIT_VALID if config.metrics.split == "valid" else SPLIT_TEST
        self.eval_mask = data.split == eval_split
        self.models: Models = build_models(spec, config, config.seed)
        for module in (self.models.cloud, self.models.patch, self.models.encoder):
            module.requires_grad_(False)
            module.eval()

    def load(self, broadcast: Broadcast) -> None:
        load_numpy_state(self.models.cloud, broadcast.model_state)
        if broadcast.patch_state is not None:
            load_numpy_state(self.models.patch, broadcast.patch_state)

    def local_samples(self, device_ids: np.ndarray, round_index: int) -> RoundSamples:
        """What a device holds in round t: its training samples of windows up to t (DESIGN.md §4)."""
        mask = (self.data.split == SPLIT_TRAIN) & (self.window <= round_index)
        return group_by_device(self.data, device_ids, mask)

    def eval_samples(self, device_ids: np.ndarray) -> RoundSamples:
        return group_by_device(self.data, device_ids, self.eval_mask)

    def z0(self, samples: RoundSamples) -> torch.Tensor:
        return first_hidden_of(self.models.cloud, self.data, samples.indices, self.config.data.history_len)

    def patch_samples(self, device_ids: np.ndarray, local: RoundSamples, x: torch.Tensor | None = None) -> LocalSamples:
        """The local samples with z_0 cached and each device's newest slice (by query position) marked for the gate;
        `x`, the samples' top-MLP inputs when the caller has them already, saves computing them again."""
        positions = self.data.seq_pos[local.indices]
        holdout_start = newest_slice_starts(positions, local.starts, local.ends, self.config.device.gate_frac)
        return LocalSamples(
            z0=self.z0(local) if x is None else self.models.cloud.first_hidden(x),
            label=torch.from_numpy(self.data.label[local.indices].astype(np.float32)),
            starts=local.starts,
            ends=local.ends,
            holdout_start=holdout_start,
            device_ids=device_ids,
        )

    def result(
        self,
        device_ids: np.ndarray,
        local: RoundSamples,
        evaluation: RoundSamples,
        start_scores: np.ndarray,
        device_scores: np.ndarray,
        *,
        samples_trained: np.ndarray,
        elapsed_s: float,
        theta: np.ndarray | None = None,
        model_sum: dict[str, np.ndarray] | None = None,
        weight: float = 0.0,
        gate_passed: np.ndarray | None = None,
        n_candidates: np.ndarray | None = None,
        n_kept: np.ndarray | None = None,
        classifier_passes: np.ndarray | None = None,
        classifier_s: float = 0.0,
    ) -> PackResult:
        """Package per-device columns; the pack's compute time is shared out in proportion to training work, and
        CoDA's classifier time (`classifier_s`, part of `elapsed_s`) in proportion to the rows each device's
        classifier passed. `gate_passed` is all False for strategies without a gate; CoDA's counts are 0 for the
        others."""
        k = self.config.metrics.k
        start = device_eval_columns(self.data, evaluation, device_ids, start_scores, k)
        device = device_eval_columns(self.data, evaluation, device_ids, device_scores, k)
        rows = np.repeat(np.arange(len(device_ids)), local.ends - local.starts)
        n_train = np.bincount(rows, weights=self.data.label[local.indices] == 1, minlength=len(device_ids))
        none = np.zeros(len(device_ids), dtype=np.int64)
        n_candidates, n_kept = (none if n_candidates is None else n_candidates), (none if n_kept is None else n_kept)
        passes = none if classifier_passes is None else classifier_passes
        work = samples_trained + (local.ends - local.starts) + (evaluation.ends - evaluation.starts) + n_candidates
        share = work / max(work.sum(), 1)
        classifier = classifier_s * passes / passes.sum() if passes.sum() else np.zeros(len(device_ids))
        columns = {
            "device_id": device_ids,
            "n_train": n_train.astype(np.int64),
            "n_test": (evaluation.ends - evaluation.starts).astype(np.int64),
            "start_auc": start["auc"],
            "device_auc": device["auc"],
            "start_hr": start["hr"],
            "device_hr": device["hr"],
            "start_ndcg": start["ndcg"],
            "device_ndcg": device["ndcg"],
            "n_queries": device["n_queries"],
            "gate_passed": np.zeros(len(device_ids), bool) if gate_passed is None else gate_passed.astype(bool),
            "samples_trained": samples_trained.astype(np.int64),
            "compute_s": share * (elapsed_s - classifier.sum()) + classifier,
            "n_candidates": n_candidates.astype(np.int64),
            "n_kept": n_kept.astype(np.int64),
            "classifier_passes": passes.astype(np.int64),
            "classifier_s": classifier,
        }
        return PackResult(columns=columns, theta=theta, model_sum=model_sum, weight=weight)


class Stopwatch:
    """Wall-clock seconds since creation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
