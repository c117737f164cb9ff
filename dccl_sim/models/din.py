"""The cloud recommender f(x; W): a DIN-style model (docs/design.md §3).

Items are embedded as item + category embeddings; the history is pooled with attention weights from
`MLP([e_h, e_t, e_h - e_t, e_h * e_t])` (masked softmax over the valid positions; when many are padding, only those
are scored); the top MLP reads `x = [pooled, e_t, pooled * e_t, profile embeddings]`. `features` and `head` are
exposed separately so that device steps compute x once per round and patches can act on the top MLP's hidden layers.
The top MLP is `Recommender`'s, shared by every model family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from dccl_sim.config import ModelConfig
from dccl_sim.data.device_data import Batch
from dccl_sim.models.all_items import first_hidden_of_users, target_layout_side
from dccl_sim.models.base import ModelSpec, Recommender, gather_rows, mlp_flops

# below this share of non-padding positions a batch scores only those (ragged); above it, all N·L positions (dense),
# where broadcasting beats gathering every position's per-sample terms. Measured on 2 threads, one process: at 42%
# valid (synthetic round samples) ragged trains 1.3× and scores 1.5× faster; scoring breaks even near 60% and
# ragged is 2× slower at 80% (ML-100K's batches are 95% valid)
RAGGED_BELOW = 0.6

# `item_side` keeps the attention logit of every (history item, target item) pair when the table has at most this
# many entries (64 MiB in float32); a larger catalogue computes the rows of a chunk's distinct history items
PAIR_TABLE_MAX = 2**24
# attention hidden values [U, H, M] computed at once by `attention_table`, bounding its memory (16 MiB in float32)
PAIR_BLOCK = 2**22
# scoring for metrics reads attention logits from the pair table (`_pair_logits`) once the history positions
# scored with one `kept` reach this share of its entries. An entry cost 0.43 of a position's attention on
# ML-100K (1 thread: the table 0.43 s, 65,536 samples' attention 0.46 s; cached, their features 17× faster)
PAIR_BUILD_SHARE = 0.5


@dataclass(frozen=True)
class HistoryPositions:
    """The history positions a batch scores, V of them: every one of the N·L (dense) or, when many are padding (a
    user's early samples), only the non-padding ones (ragged). Padding only costs work: its attention weight is 0."""

    shape: tuple[int, int]  # [N, L]
    mask: torch.Tensor  # [N, L] bool, the non-padding positions
    item: torch.Tensor  # [V] the item at each position (0 at padding)
    flat: torch.Tensor | None  # ragged: [V] index into the flattened N·L positions; dense: None
    sample: torch.Tensor | None  # ragged: [V] the sample (row) of each position, ascending; dense: None

    @classmethod
    def of(cls, history: torch.Tensor) -> HistoryPositions:
        n, length = history.shape
        ids = history.reshape(-1)
        mask = history > 0
        if int(mask.sum()) >= RAGGED_BELOW * ids.numel():
            return cls((n, length), mask, ids, None, None)
        flat = torch.nonzero(ids).squeeze(1)
        return cls((n, length), mask, ids.index_select(0, flat), flat, flat // length)

    def __len__(self) -> int:
        return int(self.item.shape[0])

    def combine(self, rows: torch.Tensor, per_sample: torch.Tensor, op: Callable) -> torch.Tensor:
        """op(rows, the per-sample row of each position): [V, k] with [N, k] -> [V, k] (op may work in place)."""
        if self.sample is None:
            n, length = self.shape
            return op(rows.view(n, length, rows.shape[1]), per_sample.unsqueeze(1)).view(n * length, rows.shape[1])
        return op(rows, gather_rows(per_sample, self.sample))

    def attention_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """The softmax over each sample's valid positions of the positions' logits [V], as [N, L]."""
        n, length = self.shape
        if self.flat is None:
            dense = logits.view(n, length).masked_fill(~self.mask, float("-inf"))
        else:
            dense = logits.new_full((n * length,), float("-inf")).index_copy(0, self.flat, logits).view(n, length)
        # an empty history (a user's first interaction) pools to zero instead of NaN
        return torch.softmax(dense, dim=1).nan_to_num(0.0)

    def pool(self, weights: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """sum over a sample's positions of weight × embedding: [N, L] with [V, d] -> [N, d]."""
        n, length = self.shape
        if self.flat is None:
            return torch.einsum("nl,nld->nd", weights, history.view(n, length, history.shape[1]))
        weighted = history * weights.reshape(-1).index_select(0, self.flat).unsqueeze(1)
        return history.new_zeros(n, history.shape[1]).index_add(0, self.sample, weighted)


class DIN(Recommender):
    """DIN-style CTR model; `forward(batch)` returns logits of shape [N]."""

    name = "din"

    def __init__(self, spec: ModelSpec, config: ModelConfig | None = None, settings: Any = None) -> None:
        super().__init__(spec, config, settings)
        config = self.config
        d = config.embed_dim
        # parameters are created in this order so that a model seeded as before is bit-identical
        self.item_embedding = nn.Embedding(spec.num_items + 1, d, padding_idx=0)
        self.category_embedding = nn.Embedding(spec.num_categories, d)
        self.profile_embeddings = nn.ModuleList(nn.Embedding(c, config.profile_dim) for c in spec.profile_cardinalities)

        sizes = [4 * d, *config.attention_hidden]
        self.attention_layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(sizes))
        self.attention_out = nn.Linear(sizes[-1], 1)

        self.build_top_mlp(3 * d + config.profile_dim * len(spec.profile_cardinalities))
        for embedding in (self.item_embedding, self.category_embedding, *self.profile_embeddings):
            nn.init.normal_(embedding.weight, std=0.05)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    @property
    def behaviour_dim(self) -> int:
        """x = [pooled, e_t, pooled * e_t, profiles]: the first three blocks describe the sample."""
        return 3 * self.config.embed_dim

    def feature_flops(self, history_len: int) -> float:
        """The attention MLP on the concatenation [e_h, e_t, e_h - e_t, e_h * e_t] at each of the L positions,
        plus 4·L·d for the difference, the product and the pooling's multiply-add. This counts the model as
        defined; `features` computes the same function with fewer FLOPs (the first layer is split by block and
        the history block projected per item), so it is an upper bound of the implementation's matrix products."""
        d = self.config.embed_dim
        attention = [4 * d, *self.config.attention_hidden, 1]
        return float(history_len * mlp_flops(attention) + 4 * history_len * d)

    def item_table(self) -> torch.Tensor:
        """Embeddings of every item index (item + its category), [num_items + 1, d]; row 0 is padding."""
        return self.item_embedding.weight + self.category_embedding(self.item_category)

    def _attention_logits(
        self, table: torch.Tensor, positions: HistoryPositions, history: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        # The first layer acts on [e_h, e_t, e_h - e_t, e_h * e_t]. Split its weight into the four blocks
        # W_h, W_t, W_d, W_p: hidden = e_h (W_h + W_d)^T + (e_h * e_t) W_p^T + e_t (W_t - W_d)^T + b — the same
        # function without the [V, 4d] concatenation. e_h (W_h + W_d)^T depends on the item alone: when there are
        # more positions than the table has items, it is projected once per item and gathered.
        first = self.attention_layers[0] if self.attention_layers else self.attention_out
        w_h, w_t, w_diff, w_prod = first.weight.chunk(4, dim=1)
        per_target = target @ (w_t - w_diff).T + first.bias
        w_history = w_h + w_diff
        if table.shape[0] <= len(positions):
            hidden = gather_rows(table @ w_history.T, positions.item)
        else:
            hidden = history @ w_history.T
        product = positions.combine(history, target, torch.mul)
        if hidden.requires_grad:
            hidden = torch.addmm(positions.combine(hidden, per_target, torch.add), product, w_prod.T)
        else:
            hidden = positions.combine(hidden, per_target, torch.Tensor.add_).addmm_(product, w_prod.T)
        if not self.attention_layers:
            return hidden.squeeze(-1)
        hidden = torch.relu(hidden) if hidden.requires_grad else hidden.relu_()
        for layer in self.attention_layers[1:]:
            hidden = torch.relu(layer(hidden))
        return self.attention_out(hidden).squeeze(-1)

    def features(self, batch: Batch) -> torch.Tensor:
        """The top-MLP input x = [pooled history, e_t, pooled * e_t, profile embeddings], shape [N, input_dim]."""
        self.check_items(batch)
        table = self.item_table()
        target = gather_rows(table, batch.item)
        pairs = self._pair_logits(table, batch.history.numel())
        if pairs is None:
            positions = HistoryPositions.of(batch.history)
            history = gather_rows(table, positions.item)
            logits = self._attention_logits(table, positions, history, target)
            pooled = positions.pool(positions.attention_weights(logits), history)
        else:
            # the attention logit of (history item, target) is a cell of the pair table: scoring reads it
            cells = (batch.history * self.num_items + (batch.item - 1).unsqueeze(1)).view(-1)
            logits = pairs.view(-1).index_select(0, cells).view(batch.history.shape)  # 3× indexing's speed
            weights = torch.softmax(logits.masked_fill_(batch.history == 0, float("-inf")), dim=1).nan_to_num_(0.0)
            pooled = functional.embedding_bag(batch.history, table, per_sample_weights=weights, mode="sum")
        parts = [pooled, target, pooled * target]
        parts += [embedding(batch.profile[:, i]) for i, embedding in enumerate(self.profile_embeddings)]
        return torch.cat(parts, dim=1)

    def _pair_logits(self, table: torch.Tensor, positions: int) -> torch.Tensor | None:
        """The attention logit of every (history item, target) pair, [M + 1, M], when scoring for metrics
        (`scoring_for_metrics`), or None. It is built once the positions scored with the scope's `kept` reach
        PAIR_BUILD_SHARE of its entries, so building it never costs much more than scoring the same positions one by
        one would have, and kept there. Catalogues of over PAIR_TABLE_MAX pairs take the per-position path; both
        compute the same function, within float rounding."""
        state = self.scoring_state
        entries = (self.num_items + 1) * self.num_items
        if state is None or entries > PAIR_TABLE_MAX:
            return None
        if "pairs" not in state:
            state["positions"] = state.get("positions", 0) + positions
            if state["positions"] < PAIR_BUILD_SHARE * entries:
                return None
            with torch.no_grad():
                state["pairs"] = self.attention_table(table, table[1:])
        return state["pairs"]

    # ---------------------------------------------------------------- scoring every item (full ranking)

    def attention_table(self, history: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The attention logit MLP([e_h, e_t, e_h - e_t, e_h * e_t]) of every history embedding [U, d] against every
        target [M, d], [U, M]. It depends on the two items alone, not on the sample. With the first layer split as
        in `_attention_logits`, hidden[u, :, m] = (W_p ⊙ e_u) e_m + e_u (W_h + W_d)ᵀ + e_m (W_t - W_d)ᵀ + b: one
        batched product with a row of ones carrying the per-history term, the per-target term as its input."""
        first = self.attention_layers[0] if self.attention_layers else self.attention_out
        w_h, w_t, w_diff, w_prod = first.weight.chunk(4, dim=1)
        per_target = (targets @ (w_t - w_diff).T + first.bias).T.unsqueeze(0)  # [1, H, M]
        right = torch.cat([targets.T, targets.new_ones(1, len(targets))])  # [d + 1, M]
        block = max(1, PAIR_BLOCK // (first.out_features * max(len(targets), 1)))
        out = []
        for start in range(0, len(history), block):
            e_h = history[start : start + block]
            left = torch.cat([w_prod.unsqueeze(0) * e_h.unsqueeze(1), (e_h @ (w_h + w_diff).T).unsqueeze(2)], 2)
            hidden = torch.baddbmm(per_target, left, right.expand(len(e_h), -1, -1))  # [u, H, M]
            if not self.attention_layers:
                out.append(hidden.squeeze(1))
                continue
            hidden = hidden.relu_().transpose(1, 2)  # [u, M, H]
            for layer in self.attention_layers[1:]:
                hidden = torch.relu(layer(hidden))
            out.append(self.attention_out(hidden).squeeze(-1))
        return torch.cat(out) if out else history.new_zeros(0, len(targets))

    def item_side(self, history_rows: int | None = None) -> dict[str, torch.Tensor]:
        """The shared layout's per-item parts and, for a catalogue of at most PAIR_TABLE_MAX pairs, the attention
        logit of every (history item, target) pair, [M + 1, M] (row 0, the padding item, is never weighted). Where
        the queries hold fewer `history_rows` than the table has rows, their own rows are computed instead."""
        side = target_layout_side(self, self.item_table())
        few = history_rows is not None and history_rows <= self.num_items
        if not few and (self.num_items + 1) * self.num_items <= PAIR_TABLE_MAX:
            side["attention"] = self.attention_table(side["table"], side["targets"])
        return side

    def first_hidden_all_items(self, batch: Batch, side: dict[str, torch.Tensor]) -> torch.Tensor:
        """z_0 of each query against every item, [Q, M, d_0]: the attention logits of the query's history items
        against every target are rows of the pair table (or of the chunk's distinct history items), softmax over
        the valid positions per target, the pooled history u [Q, M, d], then the shared first layer."""
        self.check_items(batch)
        table, history = side["table"], batch.history
        if "attention" in side:
            logits = side["attention"][history]  # [Q, L, M]
        else:
            items, where = torch.unique(history, return_inverse=True)
            logits = self.attention_table(table[items], side["targets"])[where]
        weights = torch.softmax(logits.masked_fill_((history == 0).unsqueeze(2), float("-inf")), dim=1)
        # an empty history pools to zero instead of NaN
        pooled = torch.bmm(weights.nan_to_num_(0.0).transpose(1, 2), table[history])  # [Q, M, d]
        return first_hidden_of_users(self, side, pooled, batch.profile)
