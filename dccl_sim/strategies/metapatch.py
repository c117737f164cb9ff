"""`metapatch`: each device personalizes the broadcast model with its meta-patch (eq. 3, gated), starting from
θ̂ = 0; the cloud fine-tunes W as `cloud_only` does and keeps G as bootstrapped."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from dccl_sim.algorithms.metapatch_step import metapatch_device_step, patched_logits
from dccl_sim.algorithms.protocol import Broadcast, PackResult
from dccl_sim.context import RoundContext
from dccl_sim.hosts.cloud import ModelCost
from dccl_sim.hosts.device import BROADCAST, DeviceHost, RoundSamples, Stopwatch
from dccl_sim.strategies.cloud_only import CloudOnly


@torch.no_grad()
def patched_scores(
    device: DeviceHost, evaluation: RoundSamples, theta_start: torch.Tensor | None, theta: torch.Tensor
) -> tuple[np.ndarray | str, np.ndarray]:
    """Evaluation logits of the starting and the personalized patched models, each device with its own patch;
    `theta_start` None: the start is the broadcast model itself (BROADCAST, evaluated by the cloud)."""
    cloud, patch = device.models.cloud, device.models.patch
    z0 = device.z0(evaluation)
    rows = torch.from_numpy(evaluation.rows)
    start = BROADCAST if theta_start is None else patched_logits(cloud, patch, z0, theta_start, rows).numpy()
    return start, patched_logits(cloud, patch, z0, theta, rows).numpy()


def patched_full_ranks(
    device: DeviceHost, evaluation: RoundSamples, theta_start: torch.Tensor | None, theta: torch.Tensor
) -> tuple[np.ndarray | str, np.ndarray] | None:
    """Full ranks of the starting and the personalized patched models (None when the run does not rank fully);
    `theta_start` None: the start is the broadcast model itself (BROADCAST)."""
    full = device.full_ranks(evaluation, (theta_start, theta))
    return None if full is None else (full[0], full[1])


class MetaPatch(CloudOnly):
    """Device-side MetaPatch from the starting meta-patch `start_theta` (θ̂ = 0 here); cloud_only's cloud step."""

    name = "metapatch"
    uses_patches = True
    # `start_theta` is θ̂ = 0: devices start from the broadcast model itself
    starts_from_broadcast: ClassVar[bool] = True

    def start_theta(self, broadcast: Broadcast, device_ids: np.ndarray) -> torch.Tensor:
        """Each device's starting meta-patch: θ̂ = 0, the broadcast model itself."""
        return torch.zeros(len(device_ids), self.config.patch.k)

    def device_step(
        self, device: DeviceHost, ctx: RoundContext, broadcast: Broadcast, device_ids: np.ndarray
    ) -> PackResult:
        clock = Stopwatch()
        local, evaluation = device.local_samples(device_ids, ctx.round), device.eval_samples(device_ids)
        samples = device.patch_samples(device_ids, local)
        theta_start = self.start_theta(broadcast, device_ids)
        step = metapatch_device_step(
            device.models.cloud, device.models.patch, samples, theta_start, self.config.device, ctx
        )
        start, personal = patched_scores(device, evaluation, self.scored_start(theta_start), step.theta)
        return device.result(
            device_ids,
            local,
            evaluation,
            start,
            personal,
            gate_passed=step.gate_passed,
            samples_trained=self._samples_trained(local.counts, step.gate_passed),
            elapsed_s=clock.elapsed(),
            uploads={"theta": step.theta.numpy()},
            full_ranks=patched_full_ranks(device, evaluation, self.scored_start(theta_start), step.theta),
        )

    def scored_start(self, theta_start: torch.Tensor) -> torch.Tensor | None:
        """The starting meta-patches to score and rank, None where the start is the broadcast model (evaluated by
        the cloud)."""
        return None if self.starts_from_broadcast else theta_start

    def _samples_trained(self, counts: np.ndarray, gate_passed: np.ndarray) -> np.ndarray:
        """Samples passed through training (for the latency model's FLOPs): the gate's trial plus the refit."""
        epochs = self.config.device.local_epochs
        if not self.config.device.gate:
            return counts * epochs
        trial = np.floor(counts * (1 - self.config.device.gate_frac)).astype(np.int64)
        return (trial + np.where(gate_passed, counts, 0)) * epochs

    def transfer_bytes(self, cost: ModelCost) -> tuple[int, int]:
        """Down: W and G; up: the k floats of the meta-patch."""
        return cost.model_bytes + cost.patch_bytes, cost.meta_patch_bytes

    def flops_per_trained_sample(self, cost: ModelCost) -> float:
        return cost.head + cost.patch

    def planned_samples_trained(self, n_local: np.ndarray) -> np.ndarray:
        """An upper bound under the gate: the trial run on the older part plus a full refit."""
        factor = (2.0 - self.config.device.gate_frac) if self.config.device.gate else 1.0
        return np.ceil(n_local * self.config.device.local_epochs * factor).astype(np.int64)
