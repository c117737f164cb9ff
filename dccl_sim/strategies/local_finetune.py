"""`local_finetune`: each device trains its own copy of the top MLP on fixed features; the cloud fine-tunes W as
`cloud_only` does."""

from __future__ import annotations

import numpy as np
import torch

from dccl_sim.algorithms.copies import train_copy
from dccl_sim.algorithms.protocol import Broadcast, PackResult
from dccl_sim.context import RoundContext
from dccl_sim.hosts.cloud import ModelCost
from dccl_sim.hosts.device import BROADCAST, DeviceHost, Stopwatch
from dccl_sim.strategies.cloud_only import CloudOnly


class LocalFinetune(CloudOnly):
    """The device computes its samples' top-MLP inputs x once under the broadcast model, then trains a copy of the
    head on them (Adam at `device.model_lr`); nothing is uploaded."""

    name = "local_finetune"

    def device_step(
        self, device: DeviceHost, ctx: RoundContext, broadcast: Broadcast, device_ids: np.ndarray
    ) -> PackResult:
        clock = Stopwatch()
        model = device.models.cloud
        local, evaluation = device.local_samples(device_ids, ctx.round), device.eval_samples(device_ids)
        x_local, x_eval = device.features(local), device.features(evaluation)
        label = torch.from_numpy(device.data.label[local.indices].astype(np.float32))
        personal = np.empty(len(evaluation.indices), dtype=np.float32)
        base = dict(model.named_parameters())
        trained = np.zeros(len(device_ids), dtype=np.int64)
        personal_full = []

        def forward(params: dict[str, torch.Tensor], positions: np.ndarray):
            rows = torch.from_numpy(positions)
            return model.functional_head(params, x_local[rows]), label[rows]

        for row, device_id in enumerate(device_ids):
            params = {name: base[name].detach().clone() for name in model.head_parameter_names()}
            lo, hi = local.starts[row], local.ends[row]
            trained[row] = train_copy(params, forward, lo, hi, self.config.device, ctx.keys("device_copy", device_id))
            lo, hi = evaluation.starts[row], evaluation.ends[row]
            with torch.no_grad():
                personal[lo:hi] = model.functional_head(params, x_eval[lo:hi]).numpy()
            personal_full.append(device.full_ranks_with(evaluation, row, params))
        return device.result(
            device_ids,
            local,
            evaluation,
            BROADCAST,
            personal,
            samples_trained=trained,
            elapsed_s=clock.elapsed(),
            full_ranks=(BROADCAST, personal_full) if device.full_ranking else None,
        )

    def flops_per_trained_sample(self, cost: ModelCost) -> float:
        return cost.head

    def planned_samples_trained(self, n_local: np.ndarray) -> np.ndarray:
        return n_local * self.config.device.local_epochs
