"""E_ψ(profile, θ̂) → θ̃: the cloud's encoder of next round's starting meta-patch (docs/design.md §4, eq. 7)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class PatchEncoder(nn.Module):
    """A small MLP on [profile embeddings, θ̂]. Its output layer starts at zero, so before any patch-space update
    every device starts from θ̃ = 0, the cloud model itself; `cold_start` is E_ψ(profile, 0)."""

    def __init__(self, profile_cardinalities: Sequence[int], k: int, profile_dim: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.k = k
        self.profile_embeddings = nn.ModuleList(nn.Embedding(c, profile_dim) for c in profile_cardinalities)
        self.hidden = nn.Linear(profile_dim * len(profile_cardinalities) + k, hidden)
        self.out = nn.Linear(hidden, k)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, profile: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        parts = [embedding(profile[:, i]) for i, embedding in enumerate(self.profile_embeddings)]
        return self.out(torch.tanh(self.hidden(torch.cat([*parts, theta], dim=1))))

    def cold_start(self, profile: torch.Tensor) -> torch.Tensor:
        return self.forward(profile, torch.zeros(profile.shape[0], self.k))
