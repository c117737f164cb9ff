"""The two roles of a simulation as plain classes; Ray actors and the in-process runtime wrap them unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dccl_sim import metrics
from dccl_sim.algorithms.cloud_side import CloudSide
from dccl_sim.algorithms.device_side import DeviceSide
from dccl_sim.algorithms.protocol import Broadcast, PackResult, merge_packs
from dccl_sim.algorithms.strategies import get_strategy
from dccl_sim.config import SimConfig
from dccl_sim.data.device_data import DeviceData
from dccl_sim.data.store import read_devices, read_item_category, read_meta
from dccl_sim.models.factory import ModelSpec
from dccl_sim.runtime.placement import chunk_bounds


def model_spec(dataset_root: str) -> ModelSpec:
    meta = read_meta(dataset_root)
    return ModelSpec(
        num_items=meta.num_items,
        num_categories=meta.num_categories,
        profile_cardinalities=tuple(meta.profile_cardinalities),
        item_category=read_item_category(dataset_root),
    )


def load_devices(config: SimConfig, dataset_root: str, device_ids: np.ndarray | None = None) -> DeviceData:
    """The devices' data, with validation and test samples only for the devices whose metrics the run reports
    (`metrics.eval_devices`): the sides evaluate whatever evaluation samples they hold. The others are dropped on
    load: with 99 negatives per positive they are most of the dataset, and nothing else reads them."""
    if config.metrics.eval_devices is None:
        return read_devices(dataset_root, device_ids)
    num_devices = read_meta(dataset_root).num_devices
    evaluated = metrics.evaluated_devices(config.seed, num_devices, config.metrics.eval_devices)
    return read_devices(dataset_root, device_ids, eval_samples_of=evaluated)


class CloudRole:
    """The cloud: its models and per-device state, the strategy's cloud step, evaluation and checkpoints."""

    def __init__(self, config: SimConfig, dataset_root: str, torch_threads: int | None = None) -> None:
        """`torch_threads`: None keeps torch's default."""
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.config = config
        self.strategy = get_strategy(config.strategy)
        self.side = CloudSide(config, model_spec(dataset_root), load_devices(config, dataset_root))

    def pretrain(self, cache_dir: str | None) -> dict[str, float]:
        return self.side.pretrain(Path(cache_dir) if cache_dir else None)

    def device_info(self) -> dict[str, np.ndarray]:
        """Per-device facts the driver reports by: activity bucket (0 = long tail)."""
        return {"bucket": self.side.bucket_of_device, "num_buckets": np.array(self.side.num_buckets)}

    def device_counts(self, round_index: int) -> dict[str, np.ndarray]:
        """Per device: samples held in round t (windows up to t) and evaluation samples, for the latency model."""
        return self.side.device_counts(round_index)

    def broadcast(self, round_index: int, participants: np.ndarray) -> Broadcast:
        return self.side.broadcast(round_index, participants)

    def update(self, round_index: int, results: list[PackResult]) -> dict[str, float]:
        return self.strategy.cloud_round(self.side, round_index, results)

    def evaluate(self) -> metrics.Evaluation:
        return self.side.evaluate()

    def model_size(self) -> tuple[int, int]:
        """(cloud model floats, patch floats): what a broadcast carries."""
        models = self.side.models
        return sum(p.numel() for p in models.cloud.parameters()), sum(p.numel() for p in models.patch.parameters())

    def state(self) -> dict[str, object]:
        return self.side.state()

    def load_state(self, state: dict[str, object]) -> None:
        self.side.load_state(state)


class DeviceRole:
    """A pack of devices: reads only their samples from the dataset's Parquet shards and runs their steps."""

    def __init__(
        self, config: SimConfig, dataset_root: str, device_ids: np.ndarray | range, torch_threads: int | None = None
    ) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.config = config
        self.device_ids = np.asarray(device_ids, dtype=np.int64)
        self.strategy = get_strategy(config.strategy)
        self.side = DeviceSide(config, model_spec(dataset_root), load_devices(config, dataset_root, self.device_ids))
        data = self.side.data
        # every sample a device holds (all splits): what sizes a chunk's work
        self.samples_per_device = np.bincount(data.sample_row, minlength=data.num_devices)

    def ready(self) -> bool:
        """Answers once the actor is constructed (its data loaded)."""
        return True

    def train_round(self, broadcast: Broadcast) -> PackResult:
        """The strategy's device step for this pack's participants of the round."""
        mine = self.device_ids[np.isin(self.device_ids, broadcast.participants)]
        counts = self.samples_per_device[self.side.data.rows_of(mine)]
        chunks = [mine[lo:hi] for lo, hi in chunk_bounds(counts, self.config.runtime)] or [mine]
        return merge_packs([self.strategy.device_round(self.side, broadcast, chunk) for chunk in chunks])
