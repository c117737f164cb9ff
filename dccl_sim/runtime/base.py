"""The small interface the round loop is written against; the in-process and the Ray runtime implement it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from dccl_sim import metrics
from dccl_sim.algorithms.protocol import PackResult
from dccl_sim.config import SimConfig
from dccl_sim.hosts.cloud import DeviceInfo, ModelCost
from dccl_sim.progress import Progress

PackDone = Callable[[int], None]
"""`on_pack_done(pack)`: the results of the pack with this index have arrived."""


@dataclass
class DevicePhase:
    """What came back from the packs in one round, in completion order."""

    results: list[PackResult] = field(default_factory=list)
    late_packs: list[int] = field(default_factory=list)  # missed the wall-clock deadline
    failed_packs: list[int] = field(default_factory=list)  # the actor died; restarted for the next round
    gather_s: float = 0.0  # time spent receiving results after the first one arrived


class Cloud(Protocol):
    """What the round loop asks of the cloud (the `CloudHost`'s methods, called where the cloud lives)."""

    def pretrain(self, cache_dir: str | None, on_progress: Progress | None = None) -> dict[str, float]:
        """Pretrain (or read the cached pretrained models): `pretrain_loss`, `pretrain_cached` (1.0 when read)."""

    def load_state(self, state: dict[str, object]) -> None: ...
    def device_info(self) -> DeviceInfo: ...
    def model_cost(self) -> ModelCost: ...
    def device_counts(self, round_index: int) -> dict[str, np.ndarray]: ...
    def update(self, round_index: int, participants: np.ndarray, results: list[PackResult]) -> dict[str, float]: ...
    def evaluate(self) -> metrics.Evaluation: ...
    def state(self) -> dict[str, object]: ...


class Runtime(ABC):
    """Where the cloud and the device packs live. It moves data and never does math."""

    # the Ray session (`ray.get_runtime_context().get_session_name()`) the runtime ran on; None in-process
    session_name: str | None = None

    @abstractmethod
    def start(self, config: SimConfig, dataset_root: str, packs: list[np.ndarray]) -> None:
        """Create the cloud and one device pack per entry of `packs` (sorted device ids)."""

    @property
    @abstractmethod
    def cloud(self) -> Cloud:
        """The cloud, whose methods return their values (waiting for them where the cloud is remote)."""

    @abstractmethod
    def broadcast(self, round_index: int, participants: np.ndarray) -> Any:
        """Have the cloud build the round's broadcast once, where every pack can read it; returns a handle."""

    @abstractmethod
    def run_devices(
        self, handle: Any, packs: list[int], deadline_s: float | None, on_pack_done: PackDone | None = None
    ) -> DevicePhase:
        """Run the round's device step on the given packs and gather their results, calling `on_pack_done(pack)` as
        each pack's results arrive (the progress display counts devices by it; it costs the packs no extra call)."""

    @property
    @abstractmethod
    def num_cpus(self) -> int:
        """CPUs of the machine or cluster."""

    def check(self) -> None:  # noqa: B027 - optional hook
        """Raise, saying what to do, if the runtime could not start where it is asked to (e.g. no Ray cluster at the
        given address). Cheap: a run calls it before preparing any data."""

    def resolve(self, config: SimConfig) -> SimConfig:
        """`config` with what depends on where it runs resolved (e.g. `cloud.workers = auto`)."""
        return config

    def device_cpus(self, config: SimConfig) -> int:
        """CPUs the device packs are planned on: what the cloud of `config` leaves of `num_cpus`."""
        return self.num_cpus

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release what `start` created."""
