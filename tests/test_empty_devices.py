"""Devices without data in a round: documented behaviour is θ̂ = 0 (the cloud model), no gate pass, no NaN."""

from __future__ import annotations

import numpy as np
import torch
from conftest import round_context

from dccl_sim.algorithms.metapatch_step import LocalSamples, metapatch_device_step
from dccl_sim.config import DeviceConfig
from dccl_sim.models.base import ModelSpec
from dccl_sim.models.din import DIN
from dccl_sim.models.metapatch import MetaPatch


def test_a_device_with_no_local_samples_keeps_the_cloud_model() -> None:
    torch.manual_seed(0)
    model = DIN(ModelSpec(10, 2, (), np.arange(11) % 2)).requires_grad_(False)
    patch = MetaPatch(model.hidden_sizes, k=4, rank=2).requires_grad_(False)
    z0 = torch.relu(torch.randn(30, model.hidden_sizes[0]))
    label = (torch.arange(30) % 2).float()
    # device 0 owns rows 0..29, device 1 owns nothing, device 2 owns nothing either
    samples = LocalSamples(
        z0=z0,
        label=label,
        starts=np.array([0, 30, 30]),
        ends=np.array([30, 30, 30]),
        holdout_start=np.array([24, 30, 30]),
        device_ids=np.array([0, 1, 2]),
    )
    result = metapatch_device_step(
        model, patch, samples, torch.zeros(3, 4), DeviceConfig(), round_context(seed=0, round_index=0)
    )
    assert torch.equal(result.theta[1:], torch.zeros(2, 4))
    assert not result.gate_passed[1:].any()
    assert torch.isfinite(result.theta).all()
    assert result.steps[1:].tolist() == [0, 0]
