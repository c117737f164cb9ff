"""The cloud recommender f(x; W): a DIN-style model (DESIGN.md §3).

Items are embedded as item + category embeddings; the history is pooled with attention weights from
`MLP([e_h, e_t, e_h - e_t, e_h * e_t])` (masked softmax over the valid positions); the top MLP reads
`x = [pooled, e_t, pooled * e_t, profile embeddings]`. `features` and `head` are exposed separately so that
device steps compute x once per round and patches can act on the top MLP's hidden layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise

import torch
from torch import nn

from dccl_sim.config import ModelConfig
from dccl_sim.data.device_data import Batch

# patch(layer index, hidden output z_l) -> z_l + h_l(z_l)
HiddenPatch = Callable[[int, torch.Tensor], torch.Tensor]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.num_rows = table.shape[0]
        return table.index_select(0, index.reshape(-1)).view(*index.shape, table.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        return grad.new_zeros(ctx.num_rows, flat.shape[1]).index_add_(0, index.reshape(-1), flat), None


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for a 2-D table: the same values and gradient, but the backward scatter-adds with index_add_,
    which on CPU is 4× faster than indexing's or embedding's backward (sorting 20,480 positions into 2,001 rows)."""
    return _GatherRows.apply(table, index)


class CloudModel(nn.Module):
    """DIN-style CTR model; `forward(batch)` returns logits of shape [N]."""

    def __init__(
        self,
        num_items: int,
        num_categories: int,
        profile_cardinalities: Sequence[int],
        item_category: torch.Tensor,
        config: ModelConfig | None = None,
    ) -> None:
        super().__init__()
        config = config or ModelConfig()
        d = config.embed_dim
        if item_category.shape[0] != num_items + 1:
            raise ValueError(f"item_category must have num_items + 1 = {num_items + 1} entries (index 0 is padding)")
        self.num_items = num_items
        self.register_buffer("item_category", item_category.to(torch.int64), persistent=False)
        self.item_embedding = nn.Embedding(num_items + 1, d, padding_idx=0)
        self.category_embedding = nn.Embedding(num_categories, d)
        self.profile_embeddings = nn.ModuleList(nn.Embedding(c, config.profile_dim) for c in profile_cardinalities)

        sizes = [4 * d, *config.attention_hidden]
        self.attention_layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(sizes))
        self.attention_out = nn.Linear(sizes[-1], 1)

        self.input_dim = 3 * d + config.profile_dim * len(profile_cardinalities)
        sizes = [self.input_dim, *config.mlp_hidden]
        self.hidden_layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(sizes))
        self.output_layer = nn.Linear(sizes[-1], 1)
        for embedding in (self.item_embedding, self.category_embedding, *self.profile_embeddings):
            nn.init.normal_(embedding.weight, std=0.05)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    @property
    def hidden_sizes(self) -> list[int]:
        return [layer.out_features for layer in self.hidden_layers]

    def item_table(self) -> torch.Tensor:
        """Embeddings of every item index (item + its category), [num_items + 1, d]; row 0 is padding."""
        return self.item_embedding.weight + self.category_embedding(self.item_category)

    def _attention_logits(
        self, table: torch.Tensor, history_ids: torch.Tensor, history: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        # The first layer acts on [e_h, e_t, e_h - e_t, e_h * e_t]. Split its weight into the four blocks
        # W_h, W_t, W_d, W_p: hidden = e_h (W_h + W_d)^T + (e_h * e_t) W_p^T + e_t (W_t - W_d)^T + b — the same
        # function without the [N, L, 4d] concatenation. e_h (W_h + W_d)^T depends on the item alone: when the
        # batch has more positions than the table has items, it is projected once per item and gathered.
        first = self.attention_layers[0] if self.attention_layers else self.attention_out
        w_h, w_t, w_diff, w_prod = first.weight.chunk(4, dim=1)
        n, length, d = history.shape
        per_target = target @ (w_t - w_diff).T + first.bias
        w_history = w_h + w_diff
        if table.shape[0] <= n * length:
            hidden = gather_rows(table @ w_history.T, history_ids.reshape(-1))
        else:
            hidden = history.reshape(n * length, d) @ w_history.T
        shape = (n, length, w_history.shape[0])
        product = (history * target.unsqueeze(1)).reshape(n * length, d)
        if hidden.requires_grad:
            # out of place: for in-place updates of these views autograd would copy the [N·L, H] tensor back
            hidden = torch.addmm(hidden, product, w_prod.T).view(shape) + per_target.unsqueeze(1)
        else:
            hidden = hidden.addmm_(product, w_prod.T).view(shape).add_(per_target.unsqueeze(1))
        if not self.attention_layers:
            return hidden.squeeze(-1)
        hidden = torch.relu(hidden) if hidden.requires_grad else hidden.relu_()
        for layer in self.attention_layers[1:]:
            hidden = torch.relu(layer(hidden))
        return self.attention_out(hidden).squeeze(-1)

    def _check_items(self, batch: Batch) -> None:
        if len(batch) == 0:
            return
        low, high = int(batch.item.min()), max(int(batch.item.max()), int(batch.history.max()))
        if low < 1 or high > self.num_items:
            bad = high if high > self.num_items else low
            raise ValueError(f"item id {bad} is unknown to the model (valid ids: 1..{self.num_items})")

    def features(self, batch: Batch) -> torch.Tensor:
        """The top-MLP input x = [pooled history, e_t, pooled * e_t, profile embeddings], shape [N, input_dim]."""
        self._check_items(batch)
        table = self.item_table()
        target = gather_rows(table, batch.item)
        history = gather_rows(table, batch.history)
        mask = batch.history > 0
        logits = self._attention_logits(table, batch.history, history, target).masked_fill(~mask, float("-inf"))
        # an empty history (a user's first interaction) pools to zero instead of NaN
        weights = torch.softmax(logits, dim=1).nan_to_num(0.0)
        pooled = torch.einsum("nl,nld->nd", weights, history)
        parts = [pooled, target, pooled * target]
        parts += [embedding(batch.profile[:, i]) for i, embedding in enumerate(self.profile_embeddings)]
        return torch.cat(parts, dim=1)

    def first_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """z_0, the first hidden layer's output before any patch: constant while W is frozen, so devices cache it."""
        return torch.relu(self.hidden_layers[0](x))

    def head_from_first(self, z0: torch.Tensor, patch: HiddenPatch | None = None) -> torch.Tensor:
        """The rest of the top MLP from the cached z_0; `patch(l, z_l)` may replace each hidden output z_l."""
        z = z0 if patch is None else patch(0, z0)
        for index, layer in enumerate(self.hidden_layers[1:], start=1):
            z = torch.relu(layer(z))
            if patch is not None:
                z = patch(index, z)
        return self.output_layer(z).squeeze(-1)

    def head(self, x: torch.Tensor, patch: HiddenPatch | None = None) -> torch.Tensor:
        """Top MLP on x (optionally patched, MetaPatch); returns logits [N]."""
        return self.head_from_first(self.first_hidden(x), patch)

    def forward(self, batch: Batch, patch: HiddenPatch | None = None) -> torch.Tensor:
        return self.head(self.features(batch), patch)
