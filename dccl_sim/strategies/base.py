"""The Strategy contract: one object owns an algorithm's round (docs/architecture.md).

A strategy decides what the cloud broadcasts beyond the model (`broadcast_payload`), the device step on a chunk of
a pack (`device_step`), the cloud step on what came back (`cloud_step`), its settings section (`Settings`), its
cost in the deployment latency model (`transfer_bytes`, `flops_per_trained_sample`, `device_cost`), the extra
per-device and per-round columns it records (`device_columns`, `round_columns`) and any cloud-side state a
checkpoint must keep (`state`, `load_state`). The hosts and the runtime call these and know no strategy by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from dccl_sim.algorithms.protocol import Broadcast, PackResult
from dccl_sim.config import Section, SimConfig
from dccl_sim.context import RoundContext

if TYPE_CHECKING:
    from dccl_sim.hosts.cloud import CloudHost, ModelCost
    from dccl_sim.hosts.device import DeviceHost


@dataclass(frozen=True)
class DeviceCost:
    """Modelled cost of each device's round in the deployment: FLOPs and bytes downloaded per device, bytes
    uploaded, and the part of the download that is the broadcast model itself (the same for every device)."""

    flops: np.ndarray
    download_bytes: np.ndarray
    upload_bytes: int
    model_download_bytes: int


class Strategy(ABC):
    """Base of every strategy, built-in or a user's. Subclasses set `name` and implement `device_step` and
    `cloud_step`; everything else has a default.

    One instance lives on the cloud host and one on each device host, built from the run's config; the cloud's
    instance may keep state between rounds (saved in checkpoints through `state` / `load_state`)."""

    name: ClassVar[str]
    # the strategy's own settings: a pydantic Section read from the config section `settings_key` (default: name)
    Settings: ClassVar[type[Section] | None] = None
    settings_key: ClassVar[str | None] = None
    # the broadcast carries the patch generator G (MetaPatch-style strategies)
    uses_patches: ClassVar[bool] = False
    # extra per-device columns of devices.parquet, and the value a sampled device without a result gets
    device_columns: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.settings = config.section(type(self))

    # ---------------------------------------------------------------- cloud side

    def start_cloud(self, cloud: CloudHost) -> None:  # noqa: B027 - optional hook
        """Once on the cloud host, after its models and data exist (and before a checkpoint is loaded)."""

    def broadcast_payload(self, cloud: CloudHost, ctx: RoundContext) -> Any:
        """What the round's broadcast carries beyond W (and G): built once, read by every pack."""
        return None

    @abstractmethod
    def cloud_step(self, cloud: CloudHost, ctx: RoundContext, results: list[PackResult]) -> dict[str, float]:
        """Update the cloud from the packs' results; returns statistics recorded as `cloud_<key>` round columns."""

    def state(self) -> dict[str, Any]:
        """The cloud-side state a checkpoint keeps (arrays or nested dicts of them)."""
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what `state` saved."""

    # ---------------------------------------------------------------- device side

    @abstractmethod
    def device_step(
        self, device: DeviceHost, ctx: RoundContext, broadcast: Broadcast, device_ids: np.ndarray
    ) -> PackResult:
        """The round for the given participants (sorted ids, all on this host); `device.result` packages it."""

    # ---------------------------------------------------------------- deployment model (docs/design.md §6)

    def transfer_bytes(self, cost: ModelCost) -> tuple[int, int]:
        """(download, upload) bytes per participating device: the model (and G where it is sent), nothing up."""
        return cost.model_bytes + (cost.patch_bytes if self.uses_patches else 0), 0

    def flops_per_trained_sample(self, cost: ModelCost) -> float:
        """Forward FLOPs of one sample through what the device trains (backward counts as 2× forward)."""
        return 0.0

    def planned_samples_trained(self, n_local: np.ndarray) -> np.ndarray:
        """Samples a device will pass through training this round, known before it trains (an upper bound where
        the step decides, e.g. a gate)."""
        return np.zeros_like(n_local)

    def device_cost(
        self,
        cost: ModelCost,
        n_local: np.ndarray,
        n_eval: np.ndarray,
        columns: Mapping[str, np.ndarray] | None = None,
    ) -> DeviceCost:
        """Per-device modelled cost: before the round (`columns` None, from `planned_samples_trained`) or of what
        the devices reported (`columns`, the devices' result columns). Training (forward + backward ≈ 3× forward)
        plus computing the local features and evaluating once."""
        trained = self.planned_samples_trained(n_local) if columns is None else columns["samples_trained"]
        flops = trained * 3.0 * self.flops_per_trained_sample(cost) + (n_local + n_eval) * cost.features
        download, upload = self.transfer_bytes(cost)
        return DeviceCost(flops, np.full(len(n_local), download, dtype=np.int64), upload, download)

    def round_columns(self, columns: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Extra per-round columns from the participants' result columns (e.g. means of `device_columns`)."""
        return {}
