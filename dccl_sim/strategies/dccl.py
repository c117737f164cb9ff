"""`dccl`: MetaPatch on the devices from the cloud's starting meta-patch θ̃, MoMoDistill (eq. 5) and the
patch-space update (eq. 7) on the cloud (docs/design.md §4)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from dccl_sim.algorithms.cloud_steps import (
    cloud_logits,
    distill_weight,
    momodistill_step,
    patch_space_update,
    per_sample_theta,
    teacher_logits,
    teacher_weights,
)
from dccl_sim.algorithms.protocol import Broadcast, PackResult, concat_uploads
from dccl_sim.context import RoundContext
from dccl_sim.hosts.cloud import CloudHost, ModelCost
from dccl_sim.strategies.metapatch import MetaPatch


class DCCL(MetaPatch):
    """The cloud keeps each device's starting meta-patch θ̃ (`start_theta`) and which devices it has seen; a
    participant never seen starts from the encoder's cold start E_ψ(profile, 0)."""

    name = "dccl"
    starts_from_broadcast = False

    def start_cloud(self, cloud: CloudHost) -> None:
        self.theta_tilde = np.zeros((cloud.data.num_devices, self.config.patch.k), dtype=np.float32)
        self.seen = np.zeros(cloud.data.num_devices, dtype=bool)

    @torch.no_grad()
    def broadcast_payload(self, cloud: CloudHost, ctx: RoundContext) -> np.ndarray:
        """θ̃ of the participants, [P, k] in participant order."""
        participants = ctx.participants
        theta = self.theta_tilde[participants].copy()
        fresh = ~self.seen[participants]
        if fresh.any():
            profile = torch.from_numpy(cloud.data.profile[participants[fresh]])
            theta[fresh] = cloud.models.encoder.cold_start(profile).numpy()
        return theta

    def start_theta(self, broadcast: Broadcast, device_ids: np.ndarray) -> torch.Tensor:
        rows = np.searchsorted(broadcast.participants, device_ids)
        return torch.from_numpy(broadcast.payload[rows].copy())

    def cloud_step(self, cloud: CloudHost, ctx: RoundContext, results: list[PackResult]) -> dict[str, float]:
        config, models = self.config, cloud.models
        if not results:
            return {"cloud_samples": 0.0}
        device_ids, theta = concat_uploads(results, "theta")
        indices = cloud.round_indices(device_ids, ctx.round)
        rows = np.searchsorted(device_ids, cloud.data.sample_device[indices])
        theta_of_sample = per_sample_theta(torch.from_numpy(theta), rows)
        history_len = config.data.history_len
        # base = f(x; W_t), the broadcast model without patches, for the teacher weights and residual targets
        teachers, base = teacher_logits(
            models.cloud, models.patch, cloud.data, indices, torch.from_numpy(theta), rows, history_len
        )
        weights = None
        if config.cloud.teacher_weighting != "uniform":
            patched = theta_of_sample.abs().sum(dim=1) > 0
            weights = teacher_weights(config.cloud.teacher_weighting, teachers, base, patched)
        # the same minibatch stream as cloud_only's fine-tuning: with β = 0 the cloud models are identical
        distill = momodistill_step(
            models.cloud,
            cloud.data,
            indices,
            teachers,
            config.cloud,
            history_len,
            ctx.keys("cloud_minibatches"),
            beta=distill_weight(config.cloud, ctx.round),
            weights=weights,
        )
        targets = teachers
        if config.cloud.patch_target == "residual":
            # the teachers' personalization f(x; W_t, G_t, θ̂) − f(x; W_t) on top of the refreshed W_{t+1}
            refreshed = cloud_logits(models.cloud, cloud.data, indices, history_len)
            targets = refreshed + (teachers - base)
        patch = patch_space_update(
            models.cloud,
            models.patch,
            models.encoder,
            cloud.data,
            indices,
            targets,
            theta_of_sample,
            config.cloud,
            config.patch,
            history_len,
            ctx.keys("patch_space_minibatches"),
        )
        with torch.no_grad():
            profile = torch.from_numpy(cloud.data.profile[device_ids])
            self.theta_tilde[device_ids] = models.encoder(profile, torch.from_numpy(theta)).numpy()
        self.seen[device_ids] = True
        return {
            "cloud_loss": distill[-1] if distill else float("nan"),
            "patch_loss": patch[-1] if patch else float("nan"),
            "cloud_samples": float(len(indices)),
        }

    def transfer_bytes(self, cost: ModelCost) -> tuple[int, int]:
        """MetaPatch's, plus the starting meta-patch θ̃ down."""
        download, upload = super().transfer_bytes(cost)
        return download + cost.meta_patch_bytes, upload

    def state(self) -> dict[str, Any]:
        return {"start_theta": self.theta_tilde.copy(), "seen": self.seen.copy()}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.theta_tilde = np.array(state["start_theta"], dtype=np.float32)
        self.seen = np.array(state["seen"], dtype=bool)
