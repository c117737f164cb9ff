"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020) as a dccl-sim plug-in.

FedAvg, except that each device minimizes its local loss plus the proximal term (μ/2)·‖w − w_t‖², which keeps its
copy w near the broadcast model w_t when devices' data differ. μ = 0 is FedAvg exactly.

    dccl-sim run --set strategy=fedprox:FedProx --set fedprox.mu=0.01      # from this folder, or with it on PYTHONPATH
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from dccl_sim.strategies.fedavg import FedAvg


class FedProxSettings(BaseModel):
    """The `fedprox` section of the config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mu: float = Field(0.01, ge=0.0, description="weight of the proximal term (μ)")


class FedProx(FedAvg):
    name = "fedprox"
    Settings = FedProxSettings

    def local_penalty(self, params: dict[str, torch.Tensor], broadcast: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.settings.mu == 0:
            return None
        distance = sum((value - broadcast[name]).pow(2).sum() for name, value in params.items())
        return 0.5 * self.settings.mu * distance
