"""MetaPatch (DESIGN.md §3): residual bottleneck patches on the top MLP's hidden layers.

Hidden layer l (output z_l, width d_l) becomes z_l + h_l(z_l) with h_l(z) = B_l tanh(A_l z),
A_l ∈ R^{r×d_l} and B_l ∈ R^{d_l×r}. The global patch parameters G = (Θ, {A_l}) are shared; a device holds
only its meta-patch θ̂ ∈ R^k with vec(B_1..B_L) = Θ θ̂. θ̂ = 0 gives B = 0, so the patched model is the
cloud model exactly. Per layer, Θ_l is stored as [d_l, r·k], so that for a batch with one θ̂ per sample
h_l = (tanh(A_l z) ⊗ θ̂) Θ_lᵀ — one matmul, whatever mix of devices the batch holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dccl_sim.models.din import HiddenPatch


class MetaPatch(nn.Module):
    """The global patch parameters G = (Θ, {A_l}) for hidden layers of the given widths."""

    def __init__(self, hidden_sizes: Sequence[int], k: int, rank: int) -> None:
        super().__init__()
        self.k, self.rank = k, rank
        self.down = nn.ParameterList(nn.Parameter(torch.randn(rank, d) / d**0.5) for d in hidden_sizes)
        self.basis = nn.ParameterList(nn.Parameter(torch.randn(d, rank * k) / (rank * k) ** 0.5) for d in hidden_sizes)

    @property
    def num_patch_params(self) -> int:
        """P: the number of entries of vec(B_1..B_L)."""
        return sum(basis.shape[0] * self.rank for basis in self.basis)

    def delta(self, layer: int, z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """h_l(z) for a batch whose row n belongs to the device with meta-patch theta[n]."""
        u = torch.tanh(z @ self.down[layer].T)
        outer = (u.unsqueeze(2) * theta.unsqueeze(1)).reshape(z.shape[0], self.rank * self.k)
        return outer @ self.basis[layer].T

    def patch(self, theta: torch.Tensor) -> HiddenPatch:
        """The hidden-layer patch for per-sample meta-patches theta [N, k]."""

        def apply(layer: int, z: torch.Tensor) -> torch.Tensor:
            return z + self.delta(layer, z, theta)

        return apply

    def up_matrices(self, theta: torch.Tensor) -> list[torch.Tensor]:
        """B_l for one meta-patch theta [k]: vec(B) = Θ θ, returned per layer as [d_l, r]."""
        return [(basis.view(basis.shape[0], self.rank, self.k) @ theta) for basis in self.basis]
