"""The MetaPatch device step (eq. 3), packed: K devices' meta-patches trained at once as one computation.

W and G are frozen, so the first hidden output z_0 of every local sample is computed once per round and
reused; each device follows its own seeded minibatch sequence, with its own Adam state and step count, and
drops out when its batches run out. With K = 1 this is the single-device step: the packed result equals K
single-device calls (a test holds it to 1e-5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional

from dccl_sim.algorithms.packed_adam import PackedAdam
from dccl_sim.algorithms.schedule import minibatch_schedule
from dccl_sim.config import DeviceConfig
from dccl_sim.context import RoundContext
from dccl_sim.data.device_data import index_ranges
from dccl_sim.models.base import HiddenPatch, Recommender
from dccl_sim.models.metapatch import MetaPatch, row_tiles


@dataclass(frozen=True)
class LocalSamples:
    """The round's local training samples of K devices: device m owns rows [starts[m], ends[m]), oldest first;
    rows [holdout_start[m], ends[m]) are its newest slice, which the gate checks on."""

    z0: torch.Tensor  # [S, d_0] first hidden output under the frozen broadcast model
    label: torch.Tensor  # [S]
    starts: np.ndarray  # [K]
    ends: np.ndarray  # [K]
    holdout_start: np.ndarray  # [K]
    device_ids: np.ndarray  # [K] global ids, for seeding
    weight: torch.Tensor | None = None  # [S] per-row loss weight (CoDA's augmented samples); None: all 1

    @property
    def num_devices(self) -> int:
        return len(self.starts)

    def alone(self, m: int) -> LocalSamples:
        """Device m by itself, as a pack of one: the packed step must give it the same result."""
        lo, hi = self.starts[m], self.ends[m]
        return LocalSamples(
            z0=self.z0[lo:hi],
            label=self.label[lo:hi],
            starts=np.array([0]),
            ends=np.array([hi - lo]),
            holdout_start=np.array([self.holdout_start[m] - lo]),
            device_ids=self.device_ids[m : m + 1],
            weight=None if self.weight is None else self.weight[lo:hi],
        )


@dataclass(frozen=True)
class PatchStepResult:
    theta: torch.Tensor  # [K, k] the uploaded meta-patches
    gate_passed: np.ndarray  # [K] bool
    steps: np.ndarray  # [K] optimizer steps taken (for the FLOP count of the latency model)


# A device with fewer rows than this in a call has its patch applied row by row (one GEMM over the outer products
# u ⊗ θ̂, 2·r·k·d_l FLOPs a row); from this many rows on, its B_l = Θ_l θ̂ is formed once and applied over tiles of
# 32 rows (`MetaPatch.grouped_patch`), which pads a device of few rows to a whole tile. Per call, on 1 thread, r = k
# = 16: row by row was 2.4× faster for devices of 6 rows and 7× for 3 (inference), grouped 1.7× faster for 32 rows
# forward and backward; the two meet near 14. The choice depends only on the device's own rows, so a device's
# arithmetic does not depend on which devices share its pack.
GROUPED_MIN_ROWS = 16
# Groups that average this many rows, laid out group by group, are patched a group at a time (`segment_patch`) rather
# than over padded tiles: for groups of 50–4,000 rows (an evaluation split) 2.2× faster on 1 thread, bit-identical.
SEGMENT_MIN_ROWS = 64


def patched_logits(
    model: Recommender, patch: MetaPatch, z0: torch.Tensor, theta: torch.Tensor, device: torch.Tensor
) -> torch.Tensor:
    """Logits of samples whose row n belongs to the device with meta-patch theta[device[n]]."""
    active, group, counts = torch.unique(device, return_inverse=True, return_counts=True)
    grouped = (counts >= GROUPED_MIN_ROWS)[group]
    if not grouped.any():
        return model.head_from_first(z0, patch.patch(theta[device]))
    if grouped.all():
        return model.head_from_first(z0, _grouped_patch(patch, theta[active], group.numpy()))
    few, many = torch.nonzero(~grouped).squeeze(1), torch.nonzero(grouped).squeeze(1)
    many_active, many_group = torch.unique(device[many], return_inverse=True)
    logits = torch.cat(
        [
            model.head_from_first(z0[few], patch.patch(theta[device[few]])),
            model.head_from_first(z0[many], _grouped_patch(patch, theta[many_active], many_group.numpy())),
        ]
    )
    return logits[torch.argsort(torch.cat([few, many]))]


def _grouped_patch(patch: MetaPatch, theta: torch.Tensor, group: np.ndarray) -> HiddenPatch:
    """Each group's patch formed once: over tiles of 32 rows, or, where the rows come group by group and the groups
    average SEGMENT_MIN_ROWS rows or more (an evaluation split), over each group's rows at once; the same values."""
    if len(group) >= SEGMENT_MIN_ROWS * len(theta) and (len(group) < 2 or bool(np.all(group[1:] >= group[:-1]))):
        return patch.segment_patch(theta, np.searchsorted(group, np.arange(len(theta) + 1)))
    return patch.grouped_patch(theta, row_tiles(group))


def mean_per_device(
    values: torch.Tensor, device: torch.Tensor, num_devices: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of each device's values (0 for a device without rows); with `weight`, Σ w·value / Σ w."""
    if weight is None:
        total = torch.zeros(num_devices, dtype=values.dtype).index_add(0, device, values)
        return total / torch.bincount(device, minlength=num_devices).clamp(min=1)
    total = torch.zeros(num_devices, dtype=values.dtype).index_add(0, device, weight * values)
    mass = torch.zeros(num_devices, dtype=values.dtype).index_add(0, device, weight)
    return total / torch.where(mass > 0, mass, torch.ones_like(mass))


def loss_per_device(
    model: Recommender,
    patch: MetaPatch,
    z0: torch.Tensor,
    label: torch.Tensor,
    device: torch.Tensor,
    theta: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean BCE of each device's samples (0 for a device without samples); `device` gives each row's device.
    With `weight`, each device's weighted mean Σ w·BCE / Σ w."""
    logits = patched_logits(model, patch, z0, theta, device)
    bce = functional.binary_cross_entropy_with_logits(logits, label, reduction="none")
    return mean_per_device(bce, device, theta.shape[0], weight)


def train_patches(
    model: Recommender,
    patch: MetaPatch,
    samples: LocalSamples,
    starts: np.ndarray,
    ends: np.ndarray,
    theta_start: torch.Tensor,
    config: DeviceConfig,
    seed_keys: list[tuple[int, ...]],
) -> tuple[torch.Tensor, np.ndarray]:
    """min over θ̂_m of mean BCE on rows [starts[m], ends[m]) + λ‖θ̂_m‖², Adam, for every device m at once."""
    schedule = minibatch_schedule(starts, ends, config.local_epochs, config.batch_size, seed_keys)
    theta = theta_start.detach().clone().requires_grad_(True)
    optimizer = PackedAdam([theta], lr=config.lr)
    for s in range(schedule.num_steps):
        rows, devices = schedule.step(s)
        device = torch.from_numpy(devices)
        active = torch.unique(device)
        batch = torch.from_numpy(rows)
        weight = samples.weight[batch] if samples.weight is not None else None
        per_device = loss_per_device(model, patch, samples.z0[rows], samples.label[batch], device, theta, weight)
        loss = per_device.sum() + config.l2 * theta[active].pow(2).sum()
        theta.grad = None
        loss.backward()
        optimizer.step(active)
    return theta.detach(), optimizer.steps.numpy().astype(np.int64)


def _rows(starts: np.ndarray, ends: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = ends - starts
    device = np.repeat(np.arange(len(starts)), lengths)
    return torch.from_numpy(index_ranges(starts, lengths)), torch.from_numpy(device.astype(np.int64))


@torch.no_grad()
def holdout_gate(model: Recommender, patch: MetaPatch, samples: LocalSamples, theta: torch.Tensor) -> np.ndarray:
    """True where θ lowers the loss on the device's newest slice compared with θ = 0 (the cloud model). The slice
    holds only the device's own samples, each of weight 1."""
    rows, device = _rows(samples.holdout_start, samples.ends)
    z0, label = samples.z0[rows], samples.label[rows]
    with_patch = loss_per_device(model, patch, z0, label, device, theta)
    # θ = 0 is the cloud model itself (B = 0 adds exactly zero), so its loss needs no patch
    bce = functional.binary_cross_entropy_with_logits(model.head_from_first(z0), label, reduction="none")
    without = mean_per_device(bce, device, theta.shape[0])
    has_holdout = samples.ends > samples.holdout_start
    has_train = samples.holdout_start > samples.starts
    return (with_patch < without).numpy() & has_holdout & has_train


def metapatch_device_step(
    model: Recommender,
    patch: MetaPatch,
    samples: LocalSamples,
    theta_start: torch.Tensor,
    config: DeviceConfig,
    ctx: RoundContext,
) -> PatchStepResult:
    """Eq. 3 with the gate: train on older data, keep the patch only where it helps on the newest slice
    (then refit it on all local data), otherwise fall back to θ̂ = 0. Each device's minibatches come from its own
    streams `patch_trial` and `patch_refit` of the round."""
    keys = ctx.device_keys("patch_trial", samples.device_ids)
    if not config.gate:
        theta, steps = train_patches(model, patch, samples, samples.starts, samples.ends, theta_start, config, keys)
        return PatchStepResult(theta, np.ones(samples.num_devices, dtype=bool), steps)
    trial, trial_steps = train_patches(
        model, patch, samples, samples.starts, samples.holdout_start, theta_start, config, keys
    )
    passed = holdout_gate(model, patch, samples, trial)
    refit_keys = ctx.device_keys("patch_refit", samples.device_ids)
    refit_ends = np.where(passed, samples.ends, samples.starts)
    refit, refit_steps = train_patches(
        model, patch, samples, samples.starts, refit_ends, theta_start, config, refit_keys
    )
    theta = torch.where(torch.from_numpy(passed).unsqueeze(1), refit, torch.zeros_like(refit))
    return PatchStepResult(theta, passed, trial_steps + refit_steps)
