"""`fedavg`: devices train full copies of W on their local data; the cloud takes the sample-weighted average."""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call

from dccl_sim.algorithms.copies import train_copy
from dccl_sim.algorithms.protocol import Broadcast, PackResult, load_numpy_state, merge_packs
from dccl_sim.context import RoundContext
from dccl_sim.hosts.cloud import CloudHost, ModelCost
from dccl_sim.hosts.device import BROADCAST, DeviceHost, Stopwatch
from dccl_sim.strategies.base import Strategy


class FedAvg(Strategy):
    """Each device trains its copy of W (Adam at `device.model_lr`) and uploads it; a pack sums its devices'
    models weighted by their sample counts, and the cloud divides the total by the total weight."""

    name = "fedavg"

    def local_penalty(self, params: dict[str, torch.Tensor], broadcast: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """A term added to each device's local loss, given its copy and the broadcast model (None: plain FedAvg).
        Subclasses override it, e.g. FedProx's proximal term (examples/fedprox.py)."""
        return None

    def device_step(
        self, device: DeviceHost, ctx: RoundContext, broadcast: Broadcast, device_ids: np.ndarray
    ) -> PackResult:
        clock = Stopwatch()
        model, data, history_len = device.models.cloud, device.data, self.config.data.history_len
        local, evaluation = device.local_samples(device_ids, ctx.round), device.eval_samples(device_ids)
        personal = np.empty(len(evaluation.indices), dtype=np.float32)
        # copied once per pack: the broadcast arrays are read-only views of the object store
        base = {name: torch.tensor(value) for name, value in broadcast.model_state.items()}
        total = {name: torch.zeros_like(value, dtype=torch.float64) for name, value in base.items()}
        trained = np.zeros(len(device_ids), dtype=np.int64)
        weight = 0.0
        personal_full = []

        def forward(params: dict[str, torch.Tensor], positions: np.ndarray):
            batch = data.batch(local.indices[positions], history_len)
            return functional_call(model, params, (batch,)), batch.label

        def penalty(params: dict[str, torch.Tensor]) -> torch.Tensor | None:
            return self.local_penalty(params, base)

        for row, device_id in enumerate(device_ids):
            params = {name: value.clone() for name, value in base.items()}
            lo, hi = local.starts[row], local.ends[row]
            keys = ctx.keys("device_copy", device_id)
            trained[row] = train_copy(params, forward, lo, hi, self.config.device, keys, penalty)
            n = float(hi - lo)
            for name, value in params.items():
                total[name] += n * value.detach().double()
            weight += n
            lo, hi = evaluation.starts[row], evaluation.ends[row]
            with torch.no_grad():
                batch = data.batch(evaluation.indices[lo:hi], history_len)
                personal[lo:hi] = functional_call(model, params, (batch,)).numpy()
            personal_full.append(device.full_ranks_with(evaluation, row, params))
        return device.result(
            device_ids,
            local,
            evaluation,
            BROADCAST,
            personal,
            samples_trained=trained,
            elapsed_s=clock.elapsed(),
            sums={name: value.numpy() for name, value in total.items()},
            weight=weight,
            full_ranks=(BROADCAST, personal_full) if device.full_ranking else None,
        )

    def cloud_step(self, cloud: CloudHost, ctx: RoundContext, results: list[PackResult]) -> dict[str, float]:
        total = merge_packs(results) if results else None
        if total is None or total.weight == 0:
            return {"cloud_samples": 0.0}
        state = {name: (value / total.weight).astype(np.float32) for name, value in total.sums.items()}
        load_numpy_state(cloud.models.cloud, state)
        return {"cloud_samples": total.weight}

    def transfer_bytes(self, cost: ModelCost) -> tuple[int, int]:
        """Down and up: the whole model."""
        return cost.model_bytes, cost.model_bytes

    def flops_per_trained_sample(self, cost: ModelCost) -> float:
        return cost.features + cost.head

    def planned_samples_trained(self, n_local: np.ndarray) -> np.ndarray:
        return n_local * self.config.device.local_epochs
