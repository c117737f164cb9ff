"""The in-process runtime: the same hosts, called directly. For tests, debugging and machines without Ray."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from dccl_sim.config import SimConfig
from dccl_sim.hosts.cloud import CloudHost
from dccl_sim.hosts.device import DeviceHost
from dccl_sim.runtime.base import DevicePhase, PackDone, Runtime


class LocalRuntime(Runtime):
    def __init__(self) -> None:
        self._cloud: CloudHost | None = None
        self._packs: list[DeviceHost] = []

    def start(self, config: SimConfig, dataset_root: str, packs: list[np.ndarray]) -> None:
        self._cloud = CloudHost(config, dataset_root)
        self._packs = [DeviceHost(config, dataset_root, ids) for ids in packs]

    @property
    def num_cpus(self) -> int:
        return os.cpu_count() or 1

    @property
    def cloud(self) -> CloudHost:
        assert self._cloud is not None, "start() first"
        return self._cloud

    def broadcast(self, round_index: int, participants: np.ndarray) -> Any:
        return self.cloud.broadcast(round_index, participants)

    def run_devices(
        self, handle: Any, packs: list[int], deadline_s: float | None, on_pack_done: PackDone | None = None
    ) -> DevicePhase:
        phase = DevicePhase()
        start = time.perf_counter()
        for index in packs:
            result = self._packs[index].train_round(handle)
            if deadline_s is not None and time.perf_counter() - start > deadline_s:
                phase.late_packs.append(index)
                continue
            phase.results.append(result)
            if on_pack_done is not None:
                on_pack_done(index)
        return phase
