"""The device host: a pack of devices, their local data, the broadcast models, and what a strategy's device step
needs from them (samples, cached features, evaluation, result packaging)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dccl_sim import metrics, sizing
from dccl_sim.algorithms.cloud_steps import features_of, first_hidden_of
from dccl_sim.algorithms.full_ranking import FullRanker
from dccl_sim.algorithms.metapatch_step import LocalSamples
from dccl_sim.algorithms.protocol import Broadcast, PackResult, load_numpy_state, merge_packs
from dccl_sim.config import SimConfig
from dccl_sim.context import RoundContext
from dccl_sim.data.device_data import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID, DeviceData, index_ranges
from dccl_sim.data.store import read_meta
from dccl_sim.hosts.loading import load_devices, model_spec
from dccl_sim.models.factory import Models, build_models
from dccl_sim.models.training import import_optimizer_modules
from dccl_sim.plugins import STRATEGY, resolve
from dccl_sim.runtime.placement import chunk_bounds

# In place of scores or ranks: the model is the plain broadcast model W_t, which the cloud has already evaluated (its
# evaluation after the previous round's update is the `broadcast_*` baseline), so the driver takes its per-device
# values from there rather than having every device score and rank it again.
BROADCAST = "broadcast"


@dataclass(frozen=True)
class RoundSamples:
    """Sample indices of K devices for one round, grouped by device: device m owns [starts[m], ends[m])."""

    indices: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    # the evaluation split: its scores feed metrics alone (`Recommender.scoring_for_metrics`)
    for_metrics: bool = False

    @property
    def counts(self) -> np.ndarray:
        return self.ends - self.starts

    @property
    def rows(self) -> np.ndarray:
        """The device row (0..K-1) of each sample."""
        return np.repeat(np.arange(len(self.starts)), self.ends - self.starts)


def group_by_device(data: DeviceData, device_ids: np.ndarray, mask: np.ndarray) -> RoundSamples:
    """The samples under `mask` of each device in `device_ids` (sorted), in storage (time) order."""
    # samples are stored sorted by device: each device's are one range, found by binary search rather than by a
    # pass over every sample the pack holds
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


class Stopwatch:
    """Wall-clock seconds since creation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class DeviceHost:
    """A pack of devices: reads only their samples from the dataset's Parquet shards and runs the strategy's
    device step on the round's participants among them, chunk by chunk."""

    def __init__(
        self, config: SimConfig, dataset_root: str, device_ids: np.ndarray | range, torch_threads: int | None = None
    ) -> None:
        """`torch_threads`: None keeps torch's default."""
        if torch_threads:
            torch.set_num_threads(torch_threads)
        import_optimizer_modules()
        config = self.config = sizing.for_dataset(config, read_meta(dataset_root).num_devices)
        self.device_ids = np.asarray(device_ids, dtype=np.int64)
        self.strategy = resolve(STRATEGY, config.strategy)(config)
        self.data = load_devices(config, dataset_root, self.device_ids)
        self.window = self.data.windows(config.data.windows, config.data.pretrain_frac)
        eval_split = SPLIT_VALID if config.metrics.split == "valid" else SPLIT_TEST
        self.eval_mask = self.data.split == eval_split
        self.models: Models = build_models(model_spec(dataset_root), config, config.seed)
        for module in (self.models.cloud, self.models.patch, self.models.encoder):
            module.requires_grad_(False)
            module.eval()
        # every sample a device holds (all splits): what sizes a chunk's work
        self.samples_per_device = np.bincount(self.data.sample_row, minlength=self.data.num_devices)
        self._ranker: FullRanker | None = None
        self._copy: torch.nn.Module | None = None
        self._scoring_kept: dict = {}

    def train_round(self, broadcast: Broadcast) -> PackResult:
        """The strategy's device step for this pack's participants of the round, in chunks that bound memory."""
        ctx = RoundContext(self.config, broadcast.round, broadcast.participants)
        mine = self.device_ids[np.isin(self.device_ids, broadcast.participants)]
        counts = self.samples_per_device[self.data.rows_of(mine)]
        chunks = [mine[lo:hi] for lo, hi in chunk_bounds(counts, self.config.runtime)] or [mine]
        self.load(broadcast)
        return merge_packs([self.strategy.device_step(self, ctx, broadcast, chunk) for chunk in chunks])

    # ---------------------------------------------------------------- what device steps use

    def load(self, broadcast: Broadcast) -> None:
        """Take the broadcast model (and patch generator, where the strategy sends it)."""
        load_numpy_state(self.models.cloud, broadcast.model_state)
        if broadcast.patch_state is not None:
            load_numpy_state(self.models.patch, broadcast.patch_state)
        self._ranker = self._copy = None  # built from the broadcast model when first needed
        self._scoring_kept = {}  # what evaluation scoring derived from this broadcast model

    @property
    def full_ranking(self) -> bool:
        """Whether the run ranks evaluated positives against every item (`metrics.ranking` full or both)."""
        return self.config.metrics.ranking != "sampled"

    def full_ranks(
        self, evaluation: RoundSamples, thetas: Sequence[torch.Tensor | None] = (None,)
    ) -> list[np.ndarray | str] | None:
        """Full rank of every evaluated positive of `evaluation` (in its order) under the broadcast model, once per
        entry of `thetas`: [K, k] for each device's meta-patch (K = the devices of `evaluation`), or None for the
        plain model, which gives BROADCAST instead (the cloud has ranked it). None when the run does not rank
        fully."""
        if not self.full_ranking:
            return None
        plain = [theta is None for theta in thetas]
        out: list[np.ndarray | str] = [BROADCAST] * len(thetas)
        if all(plain):
            return out
        positives = np.flatnonzero(self.data.label[evaluation.indices] == 1)
        rows = torch.from_numpy(evaluation.rows[positives])
        if self._ranker is None:
            self._ranker = FullRanker(self.models.cloud, self.models.patch, history_len=self.config.data.history_len)
        patched = [i for i, is_plain in enumerate(plain) if not is_plain]
        ranks = self._ranker.ranks_many(self.data, evaluation.indices[positives], [thetas[i][rows] for i in patched])
        for i, values in zip(patched, ranks, strict=True):
            out[i] = values
        return out

    def full_ranks_with(
        self, evaluation: RoundSamples, row: int, params: Mapping[str, torch.Tensor]
    ) -> np.ndarray | None:
        """Full ranks of the evaluated positives of device `row` of `evaluation` under the broadcast model with
        `params` (name → tensor: a device's own copy of some or all of its parameters) in place of its own. None
        when the run does not rank fully."""
        if not self.full_ranking:
            return None
        if self._copy is None:
            self._copy = copy.deepcopy(self.models.cloud)
        self._copy.load_state_dict(params, strict=False)
        indices = evaluation.indices[evaluation.starts[row] : evaluation.ends[row]]
        positives = indices[self.data.label[indices] == 1]
        ranker = FullRanker(self._copy, history_len=self.config.data.history_len, queries=len(positives))
        return ranker.ranks(self.data, positives)

    def local_samples(self, device_ids: np.ndarray, round_index: int) -> RoundSamples:
        """What a device holds in round t: its training samples of windows up to t (docs/design.md §4)."""
        mask = (self.data.split == SPLIT_TRAIN) & (self.window <= round_index)
        return group_by_device(self.data, device_ids, mask)

    def eval_samples(self, device_ids: np.ndarray) -> RoundSamples:
        return dataclasses.replace(group_by_device(self.data, device_ids, self.eval_mask), for_metrics=True)

    def features(self, samples: RoundSamples) -> torch.Tensor:
        """The top-MLP inputs x of the broadcast model on the samples (constant while W is frozen)."""
        with self._scoring(samples):
            return features_of(self.models.cloud, self.data, samples.indices, self.config.data.history_len)

    def z0(self, samples: RoundSamples) -> torch.Tensor:
        """The first hidden output of the broadcast model on the samples (constant while W is frozen)."""
        with self._scoring(samples):
            return first_hidden_of(self.models.cloud, self.data, samples.indices, self.config.data.history_len)

    def _scoring(self, samples: RoundSamples) -> contextlib.AbstractContextManager:
        if not samples.for_metrics:
            return contextlib.nullcontext()
        return self.models.cloud.scoring_for_metrics(self._scoring_kept)

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
        start_scores: np.ndarray | str,
        device_scores: np.ndarray | str,
        *,
        samples_trained: np.ndarray,
        elapsed_s: float,
        gate_passed: np.ndarray | None = None,
        uploads: dict[str, np.ndarray] | None = None,
        sums: dict[str, np.ndarray] | None = None,
        weight: float = 0.0,
        extra_columns: dict[str, np.ndarray] | None = None,
        extra_work: np.ndarray | int = 0,
        own_time_s: np.ndarray | None = None,
        full_ranks: tuple[np.ndarray | list[np.ndarray] | str, np.ndarray | list[np.ndarray] | str] | None = None,
    ) -> PackResult:
        """Package the per-device columns every strategy reports, with the strategy's `extra_columns`.

        `start_scores`, `device_scores`: logits of the evaluation samples under the starting and the personalized
        model, or BROADCAST where that model is W_t itself (the driver fills its columns from the cloud's
        evaluation). `full_ranks`: (start, device) full ranks of the evaluated positives in `evaluation`'s order,
        each one array, a list of per-device arrays (`full_ranks`, `full_ranks_with`) or BROADCAST; without them a
        run that ranks fully records NaN for this chunk's full-ranking metrics.

        The pack's compute time is shared out in proportion to each device's work (samples trained, held and
        evaluated, plus `extra_work`); time already attributed to single devices (`own_time_s`, part of
        `elapsed_s`) is theirs alone. `gate_passed` is all False for strategies without a gate."""
        start, device = (
            {} if isinstance(scores, str) else self._ranking(evaluation, device_ids, scores)
            for scores in (start_scores, device_scores)
        )
        if self.full_ranking:
            for columns_of, ranks in zip((start, device), full_ranks or (None, None), strict=True):
                if not isinstance(ranks, str):
                    columns_of |= self._full_ranking(evaluation, device_ids, ranks)
        scored = device if "n_queries" in device else start
        n_train = np.bincount(local.rows, weights=self.data.label[local.indices] == 1, minlength=len(device_ids))
        work = samples_trained + local.counts + evaluation.counts + extra_work
        share = work / max(work.sum(), 1)
        own = np.zeros(len(device_ids)) if own_time_s is None else own_time_s
        columns = {
            "device_id": device_ids,
            "n_train": n_train.astype(np.int64),
            "n_test": evaluation.counts.astype(np.int64),
            **{f"start_{name}": values for name, values in start.items() if name != "n_queries"},
            **{f"device_{name}": values for name, values in device.items() if name != "n_queries"},
            # from a model this pack scored; where both are W_t, the driver takes the cloud's count
            **({"n_queries": scored["n_queries"]} if "n_queries" in scored else {}),
            "gate_passed": np.zeros(len(device_ids), bool) if gate_passed is None else gate_passed.astype(bool),
            "samples_trained": samples_trained.astype(np.int64),
            "compute_s": share * (elapsed_s - own.sum()) + own,
            **(extra_columns or {}),
        }
        return PackResult(columns=columns, uploads=uploads or {}, sums=sums or {}, weight=weight)

    def _ranking(self, samples: RoundSamples, device_ids: np.ndarray, scores: np.ndarray) -> dict:
        idx = samples.indices
        device_of, queries, labels = self.data.sample_device[idx], self.data.query_ids(idx), self.data.label[idx]
        return metrics.per_device_ranking(device_of, queries, labels, scores, device_ids, self.config.metrics.ks)

    def _full_ranking(
        self, samples: RoundSamples, device_ids: np.ndarray, ranks: np.ndarray | list[np.ndarray] | None
    ) -> dict:
        """Per-device full-ranking metrics, "full_hr@K" ..., from the ranks of `samples`' positives (None: NaN)."""
        ks = self.config.metrics.ks
        if isinstance(ranks, list):
            ranks = np.concatenate([np.empty(0, dtype=np.int64), *ranks])
        if ranks is None:
            per_device = {name: np.full(len(device_ids), np.nan) for name in metrics.ranking_names(ks)}
        else:
            positives = samples.indices[self.data.label[samples.indices] == 1]
            per_device = metrics.per_device_rank_metrics(ranks, self.data.sample_device[positives], device_ids, ks)
            del per_device["n_queries"]
        return metrics.with_prefix(metrics.FULL, per_device)
