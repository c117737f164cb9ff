"""A YouTube-DNN-style recommender (Covington et al., RecSys 2016) as a dccl-sim model plug-in: the user is the
average of the embeddings of the items in their history, instead of DIN's attention pooling against the target.

    dccl-sim run --set model.name=mean_pool_model:MeanPool      # from this folder, or with it on PYTHONPATH

Every built-in strategy runs on it: MetaPatch patches the shared top MLP, whatever the features below it.
"""

from __future__ import annotations

import torch
from torch import nn

from dccl_sim import Recommender
from dccl_sim.models.base import gather_rows


class MeanPool(Recommender):
    """x = [mean history embedding, target embedding, their product, profile embeddings] → the shared top MLP."""

    name = "mean_pool"

    def __init__(self, spec, config=None, settings=None) -> None:
        super().__init__(spec, config, settings)
        d = self.config.embed_dim
        self.item_embedding = nn.Embedding(spec.num_items + 1, d, padding_idx=0)
        self.category_embedding = nn.Embedding(spec.num_categories, d)
        self.profile_embeddings = nn.ModuleList(
            nn.Embedding(c, self.config.profile_dim) for c in spec.profile_cardinalities
        )
        self.build_top_mlp(3 * d + self.config.profile_dim * len(spec.profile_cardinalities))

    def item_table(self) -> torch.Tensor:
        return self.item_embedding.weight + self.category_embedding(self.item_category)

    @property
    def behaviour_dim(self) -> int:
        return 3 * self.config.embed_dim

    def features(self, batch) -> torch.Tensor:
        self.check_items(batch)
        table = self.item_table()
        target = gather_rows(table, batch.item)
        mask = (batch.history > 0).unsqueeze(2).to(table.dtype)
        # padding (index 0) is masked out; an empty history averages to zero
        pooled = (gather_rows(table, batch.history) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        profile = [embedding(batch.profile[:, i]) for i, embedding in enumerate(self.profile_embeddings)]
        return torch.cat([pooled, target, pooled * target, *profile], dim=1)

    def feature_flops(self, history_len: int) -> float:
        # the masked sum over L positions and the division, then the product with the target
        return float((2 * history_len + 2) * self.config.embed_dim)
