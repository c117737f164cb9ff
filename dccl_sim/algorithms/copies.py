"""Training a device's own copy of some model parameters (FedAvg's whole model, local fine-tuning's head)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.nn import functional

from dccl_sim.algorithms.schedule import minibatch_schedule
from dccl_sim.config import DeviceConfig

# forward(parameters, positions of the minibatch's samples) -> (logits, labels)
CopyForward = Callable[[dict[str, torch.Tensor], np.ndarray], tuple[torch.Tensor, torch.Tensor]]


def train_copy(
    parameters: dict[str, torch.Tensor],
    forward: CopyForward,
    start: int,
    end: int,
    config: DeviceConfig,
    seed_keys: tuple[int, ...],
    penalty: Callable[[dict[str, torch.Tensor]], torch.Tensor | None] | None = None,
) -> int:
    """Adam at `config.model_lr` on one device's copy of `parameters` (trained in place) over its samples at
    positions [start, end), for `config.local_epochs` shuffled epochs drawn from `seed_keys`, minimizing mean BCE
    plus `penalty(parameters)` where given; returns the samples trained."""
    for tensor in parameters.values():
        tensor.requires_grad_(True)
    optimizer = torch.optim.Adam(list(parameters.values()), lr=config.model_lr)
    schedule = minibatch_schedule(
        np.array([start]), np.array([end]), config.local_epochs, config.batch_size, [seed_keys]
    )
    trained = 0
    for s in range(schedule.num_steps):
        rows, _ = schedule.step(s)
        logits, label = forward(parameters, rows)
        loss = functional.binary_cross_entropy_with_logits(logits, label)
        extra = penalty(parameters) if penalty is not None else None
        if extra is not None:
            loss = loss + extra
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        trained += len(rows)
    return trained
