"""Scoring a query against every item for models whose top-MLP input is x = [u, e_t, u ⊙ e_t, profile embeddings]
(DIN, with u the target-attended history, and SASRec, with u the encoder's user vector).

The top MLP's first layer splits by block of x:

    W_0 x + b = W_u u + W_e e_t + W_x (u ⊙ e_t) + W_p profile + b

W_e e_t depends on the item alone (cached per item, `item_side`), W_p profile + b on the query alone; only the u
terms are per (query, item). When u does not depend on the target (SASRec), W_x (u ⊙ e_t) = (W_x diag(u)) e_t, so
each query forms W_x diag(u) once and the per-pair work is one d-long product per hidden unit. The sum is one
batched matrix product: a column of ones on the per-pair side carries the per-query row, and the per-item term is
its added input.
"""

from __future__ import annotations

import torch

from dccl_sim.models.base import Recommender


def _first_layer_blocks(model: Recommender) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_u, W_e, W_x, W_p) of the top MLP's first layer, each [d_0, width of its block]."""
    d = model.config.embed_dim
    weight = model.hidden_layers[0].weight
    return weight[:, :d], weight[:, d : 2 * d], weight[:, 2 * d : 3 * d], weight[:, 3 * d :]


def target_layout_side(model: Recommender, table: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-item parts: the item table [M + 1, d], the targets e_m (items 1..M) [M, d] and W_e e_m [M, d_0]."""
    _, w_target, _, _ = _first_layer_blocks(model)
    targets = table[1:]
    return {"table": table, "targets": targets, "item_term": targets @ w_target.T}


def _query_term(model: Recommender, profile: torch.Tensor) -> torch.Tensor:
    """W_p profile + b per query, [Q, d_0]."""
    _, _, _, w_profile = _first_layer_blocks(model)
    bias = model.hidden_layers[0].bias
    embeddings = getattr(model, "profile_embeddings", ())
    if not len(embeddings):
        return bias.expand(len(profile), -1)
    parts = torch.cat([embedding(profile[:, i]) for i, embedding in enumerate(embeddings)], dim=1)
    return torch.addmm(bias, parts, w_profile.T)


def first_hidden_of_users(
    model: Recommender, side: dict[str, torch.Tensor], user: torch.Tensor, profile: torch.Tensor
) -> torch.Tensor:
    """z_0 = relu(W_0 [u, e_m, u ⊙ e_m, profile_q] + b) of every query q and item m, [Q, M, d_0]; `user` is u per
    query [Q, d] (it does not depend on the target) or per pair [Q, M, d]."""
    w_user, _, w_product, _ = _first_layer_blocks(model)
    targets, item_term = side["targets"], side["item_term"]
    q, m = len(profile), len(targets)
    query_term = _query_term(model, profile)
    if user.dim() == 2:
        # per query: right = [W_x diag(u_q); (W_u u_q + W_p profile_q + b)ᵀ], shared left = [e_m, 1]
        right = torch.cat([user.unsqueeze(2) * w_product.T.unsqueeze(0), (user @ w_user.T + query_term)[:, None]], 1)
        left = torch.cat([targets, targets.new_ones(m, 1)], dim=1).expand(q, m, -1)
    else:
        # per pair: left = [u_qm, u_qm ⊙ e_m, 1], right = [W_uᵀ; W_xᵀ; (W_p profile_q + b)ᵀ]
        ones = user.new_ones(q, m, 1)
        left = torch.cat([user, user * targets.unsqueeze(0), ones], dim=2)
        shared = torch.cat([w_user.T, w_product.T]).expand(q, -1, -1)
        right = torch.cat([shared, query_term[:, None]], dim=1)
    return torch.baddbmm(item_term.unsqueeze(0), left, right).relu_()
