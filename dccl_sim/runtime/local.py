"""The in-process runtime: the same roles, called directly. For tests, debugging and machines without Ray."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from dccl_sim.config import SimConfig
from dccl_sim.runtime.base import DevicePhase, Runtime
from dccl_sim.runtime.roles import CloudRole, DeviceRole


class LocalRuntime(Runtime):
    def __init__(self) -> None:
        self._cloud: CloudRole | None = None
        self._packs: list[DeviceRole] = []

    def start(self, config: SimConfig, dataset_root: str, packs: list[np.ndarray]) -> None:
        self._cloud = CloudRole(config, dataset_root)
        self._packs = [DeviceRole(config, dataset_root, ids) for ids in packs]

    @property
    def num_cpus(self) -> int:
        return os.cpu_count() or 1

    def cloud(self, method: str, *args: Any) -> Any:
        return getattr(self._cloud, method)(*args)

    def broadcast(self, round_index: int, participants: np.ndarray) -> Any:
        return self.cloud("broadcast", round_index, participants)

    def run_devices(self, handle: Any, packs: list[int], deadline_s: float | None) -> DevicePhase:
        phase = DevicePhase()
        start = time.perf_counter()
        for index in packs:
            result = self._packs[index].train_round(handle)
            if deadline_s is not None and time.perf_counter() - start > deadline_s:
                phase.late_packs.append(index)
            else:
                phase.results.append(result)
        return phase
