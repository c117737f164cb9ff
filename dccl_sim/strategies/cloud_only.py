"""`cloud_only`: model-over-data. Devices only contribute their data; the cloud fine-tunes W on the round's window."""

from __future__ import annotations

import numpy as np

from dccl_sim.algorithms.cloud_steps import finetune
from dccl_sim.algorithms.protocol import Broadcast, PackResult, received_devices
from dccl_sim.context import RoundContext
from dccl_sim.hosts.cloud import CloudHost
from dccl_sim.hosts.device import BROADCAST, DeviceHost, Stopwatch
from dccl_sim.strategies.base import Strategy


class CloudOnly(Strategy):
    """The devices keep the broadcast model (the cloud evaluates it); the cloud fine-tunes W on the data the
    participants held in the round's window (the cloud step `metapatch`, `local_finetune` and `coda` share)."""

    name = "cloud_only"

    def device_step(
        self, device: DeviceHost, ctx: RoundContext, broadcast: Broadcast, device_ids: np.ndarray
    ) -> PackResult:
        clock = Stopwatch()
        local, evaluation = device.local_samples(device_ids, ctx.round), device.eval_samples(device_ids)
        untrained = np.zeros(len(device_ids), dtype=np.int64)
        return device.result(
            device_ids,
            local,
            evaluation,
            BROADCAST,
            BROADCAST,
            samples_trained=untrained,
            elapsed_s=clock.elapsed(),
            full_ranks=(BROADCAST, BROADCAST) if device.full_ranking else None,
        )

    def cloud_step(self, cloud: CloudHost, ctx: RoundContext, results: list[PackResult]) -> dict[str, float]:
        indices = cloud.round_indices(received_devices(results), ctx.round)
        losses = finetune(
            cloud.models.cloud,
            cloud.data,
            indices,
            self.config.cloud,
            self.config.data.history_len,
            ctx.keys("cloud_minibatches"),
        )
        return {"cloud_loss": losses[-1] if losses else float("nan"), "cloud_samples": float(len(indices))}
