"""Full-ranking evaluation: a frozen model scores every item for each evaluated query, and each positive is ranked
among its candidates (data/candidates.py), ties counted against it as in `metrics.positive_ranks`:

    r_q = #{items j ∉ E(q), j ≠ p_q : s_q(j) ≥ s_q(p_q)}

The score s_q(j) of item j is the model's logit for the query's history and profile with target j: the same value as
`model(batch)` on that sample (tests hold it to 1e-5), optionally under a per-query MetaPatch meta-patch θ (the
personalized device models). The model computes z_0 of all items through `Recommender.first_hidden_all_items`,
reusing `item_side()`; the rest of the top MLP runs on the [Q, M, d_0] rows of a chunk of queries. Several models
sharing W (a round's broadcast, starting and personalized models) share z_0 (`ranks_many`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional

from dccl_sim.data.candidates import Exclusions, exclusions
from dccl_sim.data.device_data import Batch, DeviceData
from dccl_sim.models.base import Recommender
from dccl_sim.models.metapatch import MetaPatch

# (query, item) pairs scored at once: a chunk holds Q = CHUNK_PAIRS // M queries, and the top MLP's hidden
# outputs of the chunk ([pairs, 200] floats at the default sizes, 12.5 MiB) stay near the cache
CHUNK_PAIRS = 16384


def ranks_among_candidates(scores: torch.Tensor, positive: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's positive among its candidates: r_q = #{j : not excluded[q, j], j ≠ p_q,
    scores[q, j] ≥ scores[q, p_q]} (ties against the positive). scores [Q, M] with column m holding item m + 1,
    positive [Q] item ids, excluded [Q, M] bool; a positive must not be excluded."""
    column = (positive - 1).unsqueeze(1)
    if bool(excluded.gather(1, column).any()):
        raise ValueError("a query's positive item is among its excluded items")
    at_least = scores >= scores.gather(1, column)
    return (at_least & ~excluded).sum(1) - 1  # the positive itself is counted once


class FullRanker:
    """Ranks evaluated positives against every candidate item under a frozen model (and, optionally, MetaPatch
    meta-patches). `item_side()` is computed at construction: build a new ranker whenever the weights change;
    `queries`, where known, is how many it will rank (a model may then cache less)."""

    def __init__(
        self,
        model: Recommender,
        patch: MetaPatch | None = None,
        *,
        history_len: int,
        chunk_pairs: int = CHUNK_PAIRS,
        queries: int | None = None,
    ) -> None:
        self.model, self.patch, self.history_len = model, patch, history_len
        self.num_items = model.num_items
        self.queries_per_chunk = max(1, chunk_pairs // self.num_items)
        model.eval()
        with torch.no_grad():
            self.side = model.item_side(None if queries is None else queries * history_len)

    @torch.no_grad()
    def scores(self, batch: Batch, theta: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [Q, M] of each query of `batch` (its history and profile) against every item, column m holding
        item m + 1; with `theta` [Q, k], query q's under the meta-patch theta[q]."""
        return self._head(self.model.first_hidden_all_items(batch, self.side), theta)

    @torch.no_grad()
    def _head(self, z0: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
        """Logits [Q, M] from z_0 [Q, M, d_0]: the rest of the top MLP, under query q's meta-patch theta[q] if given."""
        q, m, width = z0.shape
        if theta is None:
            return self.model.head_from_first(z0.view(q * m, width)).view(q, m)
        if self.patch is None:
            raise ValueError("meta-patches need the ranker's MetaPatch parameters (patch=...)")
        # z_l' = z_l + B_l u_l with u_l = tanh(A_l z_l) (models/metapatch.py), so the next linear layer's
        # W z_l' = W z_l + (W B_l) u_l: a query's M rows share θ, so W B_l is formed once per query and no
        # [Q, M, d_l] patched copy of z_l is made
        layers = [*self.model.hidden_layers[1:], self.model.output_layer]
        z = z0
        for down, up, layer in zip(self.patch.down, self.patch.up_transposes(theta), layers, strict=True):
            u = torch.tanh(z @ down.T)  # [Q, M, r]
            z = functional.linear(z, layer.weight, layer.bias).baddbmm_(u, up @ layer.weight.T)
            if layer is not self.model.output_layer:
                z = z.relu_()
        return z.view(q, m)

    def ranks(
        self,
        data: DeviceData,
        query_indices: np.ndarray,
        excluded: Exclusions | None = None,
        theta: torch.Tensor | None = None,
    ) -> np.ndarray:
        """Full rank (int64) of the positive of every query, in the order of `query_indices` (positive samples of
        `data`); `excluded` defaults to `exclusions(data, query_indices)`, `theta` [Q, k] gives query q's
        meta-patch."""
        return self.ranks_many(data, query_indices, [theta], excluded)[0]

    def ranks_many(
        self,
        data: DeviceData,
        query_indices: np.ndarray,
        thetas: Sequence[torch.Tensor | None],
        excluded: Exclusions | None = None,
    ) -> list[np.ndarray]:
        """`ranks` under several models that share W, one per entry of `thetas` (None: the plain model; [Q, k]:
        per-query meta-patches). z_0 of a chunk is computed once for all of them: the broadcast, starting and
        personalized models of a MetaPatch round differ only in their patches."""
        query_indices = np.asarray(query_indices, dtype=np.int64)
        excluded = exclusions(data, query_indices) if excluded is None else excluded
        if len(excluded) != len(query_indices):
            raise ValueError(f"{len(excluded)} exclusion rows for {len(query_indices)} queries")
        out = [np.empty(len(query_indices), dtype=np.int64) for _ in thetas]
        for start in range(0, len(query_indices), self.queries_per_chunk):
            stop = min(start + self.queries_per_chunk, len(query_indices))
            batch = data.batch(query_indices[start:stop], self.history_len)
            with torch.no_grad():
                z0 = self.model.first_hidden_all_items(batch, self.side)
            mask = excluded.mask(start, stop, self.num_items)
            for ranks, theta in zip(out, thetas, strict=True):
                scores = self._head(z0, None if theta is None else theta[start:stop])
                ranks[start:stop] = ranks_among_candidates(scores, batch.item, mask).numpy()
        return out
