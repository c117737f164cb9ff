"""Reading what a host needs from a dataset directory."""

from __future__ import annotations

import numpy as np

from dccl_sim import metrics
from dccl_sim.config import SimConfig
from dccl_sim.data.device_data import DeviceData
from dccl_sim.data.store import read_devices, read_item_category, read_meta, samples_per_device
from dccl_sim.models.factory import ModelSpec


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
    (`metrics.eval_devices`): the hosts evaluate whatever evaluation samples they hold. The others are dropped on
    load: with 99 negatives per positive they are most of the dataset, and nothing else reads them."""
    return read_devices(dataset_root, device_ids, eval_samples_of=_evaluated(config, dataset_root))


def device_work(config: SimConfig, dataset_root: str) -> np.ndarray:
    """The samples each device's host will hold (`load_devices`): what a device step's time grows with."""
    return samples_per_device(dataset_root, _evaluated(config, dataset_root))


def _evaluated(config: SimConfig, dataset_root: str) -> np.ndarray | None:
    if config.metrics.eval_devices is None:
        return None
    num_devices = read_meta(dataset_root).num_devices
    return metrics.evaluated_devices(config.seed, num_devices, config.metrics.eval_devices)
