"""A SASRec-style sequence encoder (Kang & McAuley, ICDM 2018) in place of DIN's target attention (docs/design.md §8).

Items are embedded as DIN's (item + category embeddings, `item_table`). The history is encoded by `blocks`
pre-LayerNorm Transformer blocks (causal multi-head self-attention over the valid positions, then a point-wise
feed-forward layer d → d → d, each with a residual), over item embeddings plus learned position embeddings. The
user representation u is the encoder's output at the newest history item; the top MLP reads
`x = [u, e_t, u * e_t, profile embeddings]`, the same layout as DIN's, so CoDA's behaviour block is 3·d again.

Histories are right-aligned (`Batch`: padding first, the newest item in the last column), so the newest item is
column L - 1 whenever the history is not empty; position p (0 = the newest) has its own embedding, whatever L.
The last block only computes the output of that column: the others' outputs would be discarded.
An empty history (a user's first interaction) gives u = 0, never NaN. Nothing mixes samples (attention runs within
a sample, LayerNorm per position), so a sample's x does not depend on its batch.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional

from dccl_sim.config import ModelConfig, Section
from dccl_sim.data.device_data import Batch
from dccl_sim.models.all_items import first_hidden_of_users, target_layout_side
from dccl_sim.models.base import ModelSpec, Recommender, gather_rows


class SASRecSettings(Section):
    """The encoder's own settings (config section `sasrec`). The paper's defaults: 2 blocks, 1 head. A dropout
    above 0 draws from torch's global generator while training, so results then depend on the order in which a
    process trains its samples (placement invariance needs 0, the default)."""

    blocks: Annotated[int, Field(ge=1)] = 2
    heads: Annotated[int, Field(ge=1)] = 1
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    max_len: Annotated[int, Field(ge=1)] = 50  # position embeddings: the longest history the model reads


class _Block(nn.Module):
    """One pre-LN Transformer block: h + attention(LN(h)), then + FFN(LN(·))."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.attention_norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.attention_out = nn.Linear(d, d)
        self.ffn_norm = nn.LayerNorm(d)
        self.ffn_in = nn.Linear(d, d)
        self.ffn_out = nn.Linear(d, d)

    def _drop(self, h: torch.Tensor) -> torch.Tensor:
        return functional.dropout(h, self.dropout, self.training) if self.dropout > 0 else h

    def forward(self, h: torch.Tensor, allowed: torch.Tensor, newest_only: bool) -> torch.Tensor:
        """h [N, L, d] → [N, Q, d]: every position's output (Q = L), or only the last column's (Q = 1).
        `allowed` [N, 1, Q, L] says which keys each query attends to."""
        n, length, d = h.shape
        a = self.attention_norm(h)
        if newest_only:
            h = h[:, -1:]
            q = functional.linear(a[:, -1:], self.qkv.weight[:d], self.qkv.bias[:d])
            k, v = functional.linear(a, self.qkv.weight[d:], self.qkv.bias[d:]).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(a).chunk(3, dim=-1)
        heads, dh, queries = self.heads, d // self.heads, 1 if newest_only else length
        q = q.reshape(n, queries, heads, dh).transpose(1, 2)  # [N, H, Q, dh]
        k = k.reshape(n, length, heads, dh).transpose(1, 2)
        v = v.reshape(n, length, heads, dh).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)).mul_(dh**-0.5).masked_fill_(~allowed, float("-inf"))
        weights = self._drop(torch.softmax(scores, dim=-1))
        attended = (weights @ v).transpose(1, 2).reshape(n, queries, d)
        h = h + self._drop(self.attention_out(attended))
        return h + self._drop(self.ffn_out(torch.relu(self.ffn_in(self.ffn_norm(h)))))


class SASRec(Recommender):
    """SASRec-style CTR model; `forward(batch)` returns logits of shape [N]."""

    name = "sasrec"
    Settings = SASRecSettings
    settings_key = "sasrec"

    def __init__(self, spec: ModelSpec, config: ModelConfig | None = None, settings: Any = None) -> None:
        super().__init__(spec, config, settings if settings is not None else SASRecSettings())
        config, settings = self.config, self.settings
        d = config.embed_dim
        if d % settings.heads:
            raise ValueError(f"sasrec.heads ({settings.heads}) must divide model.embed_dim ({d})")
        self.item_embedding = nn.Embedding(spec.num_items + 1, d, padding_idx=0)
        self.category_embedding = nn.Embedding(spec.num_categories, d)
        self.profile_embeddings = nn.ModuleList(nn.Embedding(c, config.profile_dim) for c in spec.profile_cardinalities)
        self.position_embedding = nn.Embedding(settings.max_len, d)  # row p: p items before the newest
        self.blocks = nn.ModuleList(_Block(d, settings.heads, settings.dropout) for _ in range(settings.blocks))
        self.final_norm = nn.LayerNorm(d)
        self.build_top_mlp(3 * d + config.profile_dim * len(spec.profile_cardinalities))
        embeddings = (self.item_embedding, self.category_embedding, self.position_embedding, *self.profile_embeddings)
        for embedding in embeddings:
            nn.init.normal_(embedding.weight, std=0.05)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    @property
    def behaviour_dim(self) -> int:
        """x = [u, e_t, u * e_t, profiles]: the first three blocks describe the sample."""
        return 3 * self.config.embed_dim

    def feature_flops(self, history_len: int) -> float:
        """The encoder's matrix products per sample, at history length L, width d, B blocks:
        each block but the last, 12·L·d² (Q, K, V, output and the two FFN projections at L positions) + 4·L²·d
        (scores and weighted values, L queries × L keys); the last block, for the newest position only,
        4·L·d² (K, V) + 8·d² (Q, output, FFN) + 4·L·d. Element-wise work (LayerNorm, softmax, residuals, u * e_t)
        is left out: a few per cent of the total at the default sizes."""
        length, d, blocks = history_len, self.config.embed_dim, self.settings.blocks
        full = 12 * length * d * d + 4 * length * length * d
        last = 4 * length * d * d + 8 * d * d + 4 * length * d
        return float((blocks - 1) * full + last)

    def item_table(self) -> torch.Tensor:
        """Embeddings of every item index (item + its category), [num_items + 1, d]; row 0 is padding."""
        return self.item_embedding.weight + self.category_embedding(self.item_category)

    def user_representation(self, history: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """u [N, d]: the encoder's output at the newest item of each right-aligned history [N, L]; 0 if empty."""
        n, length = history.shape
        if length > self.settings.max_len:
            raise ValueError(f"history length {length} exceeds sasrec.max_len ({self.settings.max_len})")
        valid = history > 0
        if n and not bool((valid[:, 1:] >= valid[:, :-1]).all()):
            raise ValueError("histories must be right-aligned (padding first, the newest item last)")
        table = self.item_table() if table is None else table
        h = gather_rows(table, history) + self.position_embedding.weight[:length].flip(0)
        # a query attends to the valid keys up to itself, and always to itself: a padding query then has one
        # finite score instead of none (softmax over nothing is NaN, and NaN · 0 would leak into valid rows)
        causal = torch.ones(length, length, dtype=torch.bool, device=history.device).tril()
        itself = torch.eye(length, dtype=torch.bool, device=history.device)
        full = ((valid.unsqueeze(1) & causal) | itself).unsqueeze(1)  # [N, 1, L, L]
        last = full[:, :, -1:]  # [N, 1, 1, L]
        for index, block in enumerate(self.blocks):
            newest_only = index == len(self.blocks) - 1
            h = block(h, last if newest_only else full, newest_only)
        u = self.final_norm(h[:, -1])
        return u * valid[:, -1:].to(u.dtype)

    def features(self, batch: Batch) -> torch.Tensor:
        """The top-MLP input x = [u, e_t, u * e_t, profile embeddings], shape [N, input_dim]."""
        self.check_items(batch)
        table = self.item_table()
        target = gather_rows(table, batch.item)
        u = self.user_representation(batch.history, table)
        parts = [u, target, u * target]
        parts += [embedding(batch.profile[:, i]) for i, embedding in enumerate(self.profile_embeddings)]
        return torch.cat(parts, dim=1)

    def item_side(self, history_rows: int | None = None) -> dict[str, torch.Tensor]:
        """The item table and the per-item parts of the top MLP's first layer (models/all_items.py)."""
        return target_layout_side(self, self.item_table())

    def first_hidden_all_items(self, batch: Batch, side: dict[str, torch.Tensor]) -> torch.Tensor:
        """z_0 of each query against every item, [Q, M, d_0]: u does not depend on the target, so the encoder runs
        once per query and only the first layer's u ⊙ e_m term is per pair."""
        self.check_items(batch)
        u = self.user_representation(batch.history, side["table"])
        return first_hidden_of_users(self, side, u, batch.profile)
