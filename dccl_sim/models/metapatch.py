"""MetaPatch (docs/design.md §3): residual bottleneck patches on the top MLP's hidden layers.

Hidden layer l (output z_l, width d_l) becomes z_l + h_l(z_l) with h_l(z) = B_l tanh(A_l z),
A_l ∈ R^{r×d_l} and B_l ∈ R^{d_l×r}. The global patch parameters G = (Θ, {A_l}) are shared; a device holds
only its meta-patch θ̂ ∈ R^k with vec(B_1..B_L) = Θ θ̂. θ̂ = 0 gives B = 0, so the patched model is the
cloud model exactly. Per layer, Θ_l is stored as [d_l, r·k], so that for a batch with one θ̂ per sample
h_l = (tanh(A_l z) ⊗ θ̂) Θ_lᵀ — one matmul, whatever mix of devices the batch holds: 2·r·k·d_l FLOPs a sample.
When a batch holds many samples of each device, `grouped_patch` forms each device's B_l = Θ_l θ̂ once
(2·r·k·d_l FLOPs a device) and applies it with one batched matmul over tiles of that device's rows
(2·r·d_l FLOPs a sample): k times fewer FLOPs per sample, the same function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
from torch import nn

from dccl_sim.models.base import HiddenPatch


@dataclass(frozen=True)
class RowTiles:
    """Rows of a batch laid out in tiles of `tile` rows, each tile holding rows of one group (device) only, so
    that one batched matmul applies every group's own matrix; padding rows are zero."""

    tile_group: torch.Tensor  # [T] the group of each tile
    position: torch.Tensor  # [N] each row's slot in the flat [T * tile] layout
    tile: int

    @property
    def num_tiles(self) -> int:
        return len(self.tile_group)


def row_tiles(group: np.ndarray, tile: int = 32) -> RowTiles:
    """Tiles of `tile` rows for rows whose groups are `group` [N] (any order); a group longer than a tile spans
    several. The tile is fixed, not fitted to the batch, so that a row's arithmetic does not depend on which other
    devices share its batch (results must not depend on packing). 32, the device step's minibatch, was the fastest
    for devices of 14 rows on average (1.4× the per-row patch, forward and backward) and near the best for 500."""
    group = np.asarray(group, dtype=np.int64)
    if len(group) == 0:
        return RowTiles(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), tile)
    order = np.argsort(group, kind="stable")
    present, first, counts = np.unique(group[order], return_index=True, return_counts=True)
    tiles_per_group = -(-counts // tile)
    tile_start = np.concatenate([[0], np.cumsum(tiles_per_group)[:-1]])
    rank = np.arange(len(group)) - np.repeat(first, counts)
    slot = (np.repeat(tile_start, counts) + rank // tile) * tile + rank % tile
    position = np.empty(len(group), dtype=np.int64)
    position[order] = slot
    return RowTiles(
        tile_group=torch.from_numpy(np.repeat(present, tiles_per_group)),
        position=torch.from_numpy(position),
        tile=tile,
    )


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

    def flops_per_sample(self) -> float:
        """Forward FLOPs the per-sample patch (`patch`) adds to one sample: per hidden layer of width d_l,
        A_l z (2·r·d_l) and (tanh(A_l z) ⊗ θ̂) Θ_lᵀ (2·r·k·d_l)."""
        return float(sum(2 * basis.shape[0] * self.rank * (1 + self.k) for basis in self.basis))

    def delta(self, layer: int, z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """h_l(z) for a batch whose row n belongs to the device with meta-patch theta[n]."""
        u = torch.tanh(z @ self.down[layer].T)
        outer = (u.unsqueeze(2) * theta.unsqueeze(1)).reshape(z.shape[0], self.rank * self.k)
        return outer @ self.basis[layer].T

    def grouped_delta(self, layer: int, z: torch.Tensor, up: torch.Tensor, tiles: RowTiles) -> torch.Tensor:
        """h_l(z) for a batch whose rows belong to the groups of `tiles`; up [G, r, d_l] holds each group's B_lᵀ."""
        u = torch.tanh(z @ self.down[layer].T)
        padded = u.new_zeros(tiles.num_tiles * tiles.tile, self.rank).index_copy(0, tiles.position, u)
        # with one tile per group, tile_group is 0..G-1 and the matrices need no copy
        per_tile = up if tiles.num_tiles == len(up) else up[tiles.tile_group]
        out = torch.bmm(padded.view(tiles.num_tiles, tiles.tile, self.rank), per_tile)
        return out.view(-1, z.shape[1])[tiles.position]

    def up_transposes(self, theta: torch.Tensor) -> list[torch.Tensor]:
        """B_lᵀ of each meta-patch of theta [G, k], per layer l as [G, r, d_l]."""
        return [
            (theta @ basis.view(-1, self.k).T).view(len(theta), basis.shape[0], self.rank).transpose(1, 2)
            for basis in self.basis
        ]

    def grouped_patch(self, theta: torch.Tensor, tiles: RowTiles) -> HiddenPatch:
        """The hidden-layer patch for rows grouped by device: theta [G, k] holds one meta-patch per group."""
        ups = self.up_transposes(theta)

        def apply(layer: int, z: torch.Tensor) -> torch.Tensor:
            return z + self.grouped_delta(layer, z, ups[layer], tiles)

        return apply

    def segment_patch(self, theta: torch.Tensor, bounds: np.ndarray) -> HiddenPatch:
        """The hidden-layer patch for rows laid out group by group, group g's rows being [bounds[g], bounds[g + 1]):
        each group's B_l applied with one matmul over its rows, no padding to tiles and no gather back. The same
        values as `grouped_patch` (each row's product is the same dot products) and faster when groups hold many
        rows (an evaluation split); the tiles' one batched matmul wins for many small groups (training steps)."""
        ups = self.up_transposes(theta)

        def apply(layer: int, z: torch.Tensor) -> torch.Tensor:
            u = torch.tanh(z @ self.down[layer].T)
            delta = torch.empty_like(z)
            for g, (lo, hi) in enumerate(pairwise(bounds.tolist())):
                torch.mm(u[lo:hi], ups[layer][g], out=delta[lo:hi])
            return z + delta

        return apply

    def patch(self, theta: torch.Tensor) -> HiddenPatch:
        """The hidden-layer patch for per-sample meta-patches theta [N, k]."""

        def apply(layer: int, z: torch.Tensor) -> torch.Tensor:
            return z + self.delta(layer, z, theta)

        return apply

    def up_matrices(self, theta: torch.Tensor) -> list[torch.Tensor]:
        """B_l for one meta-patch theta [k]: vec(B) = Θ θ, returned per layer as [d_l, r]."""
        return [(basis.view(basis.shape[0], self.rank, self.k) @ theta) for basis in self.basis]
