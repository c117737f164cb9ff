"""The recommender contract (docs/design.md §3, §8): what every cloud model offers the algorithms and the latency model.

A recommender is a feature extractor (its own family: DIN's target attention, a sequence encoder, ...) feeding
the top MLP that every model shares, implemented here. The algorithms rely on this split:
- MetaPatch patches the top MLP's hidden layers (`head_from_first(z0, patch)`, `head(x, patch)`), and devices
  cache z_0 = `first_hidden(x)` while W is frozen;
- MoMoDistill and fine-tuning train the whole model through `forward(batch)` (logits [N]);
- LocalFinetune trains a per-device copy of the head with torch.func: `functional_head(params, x)` over the
  parameters `head_parameter_names()`;
- CoDA ships candidates as x, represents users by `item_table()` and classifies samples on the first
  `behaviour_dim` columns of x (what describes the sample rather than the user's constant profile);
- the deployment latency model prices `feature_flops(L)`, `head_flops()` and `first_hidden_flops()`.
A sample's outputs must not depend on which other samples share its batch (placement invariance), so a model
must not mix rows (no batch statistics).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from dccl_sim.config import ModelConfig, Section
from dccl_sim.data.device_data import Batch

# patch(layer index, hidden output z_l) -> z_l + h_l(z_l)
HiddenPatch = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """What the models need to know about the data: vocabulary sizes and the item → category table."""

    num_items: int
    num_categories: int
    profile_cardinalities: tuple[int, ...]
    item_category: np.ndarray  # [num_items + 1], index 0 is padding (a tensor is accepted too)


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


def mlp_flops(sizes: Sequence[int]) -> int:
    """Multiply-add FLOPs of one row through linear layers of the given widths: sum of 2·a·b."""
    return sum(2 * a * b for a, b in pairwise(sizes))


class Recommender(nn.Module, ABC):
    """A CTR model: features x of a sample (the subclass), then the shared top MLP x → hidden layers → logit.

    Subclasses set `name` (what `model.name` selects), optionally `Settings` (a `Section`, validated from the
    config section `settings_key`, default `name`), take `(spec, config, settings)` and, in `__init__`, create
    their parameters and call `build_top_mlp(input_dim)` (seeded models are reproducible only if the order of
    parameter creation is fixed). They implement `features`, `item_table`, `behaviour_dim` and `feature_flops`.
    """

    name: ClassVar[str]
    Settings: ClassVar[type[Section] | None] = None
    settings_key: ClassVar[str | None] = None

    hidden_layers: nn.ModuleList
    output_layer: nn.Linear
    input_dim: int

    def __init__(self, spec: ModelSpec, config: ModelConfig | None = None, settings: Any = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        self.settings = settings
        self.num_items = spec.num_items
        item_category = torch.as_tensor(spec.item_category).to(torch.int64)
        if item_category.shape[0] != spec.num_items + 1:
            expected = spec.num_items + 1
            raise ValueError(f"item_category must have num_items + 1 = {expected} entries (index 0 is padding)")
        self.register_buffer("item_category", item_category, persistent=False)

    # ---------------------------------------------------------------- implemented by each model family

    @abstractmethod
    def features(self, batch: Batch) -> torch.Tensor:
        """The top-MLP input x of each sample, [N, input_dim]; a row depends on that sample alone."""

    @abstractmethod
    def item_table(self) -> torch.Tensor:
        """Embeddings of every item index, [num_items + 1, d]; row 0 is padding."""

    @property
    @abstractmethod
    def behaviour_dim(self) -> int:
        """How many leading columns of x describe the sample (history, target) rather than the user's profile."""

    @abstractmethod
    def feature_flops(self, history_len: int) -> float:
        """Forward FLOPs of `features` per sample at history length L."""

    # ---------------------------------------------------------------- scoring every item (full ranking)

    def item_side(self, history_rows: int | None = None) -> dict[str, torch.Tensor]:
        """What `first_hidden_all_items` reuses for every query because it depends on the items (and the frozen
        weights) alone; the caller computes it once per model state. `history_rows`, when known, bounds the history
        positions the queries that use it hold (e.g. one device's few queries), for a model to skip caching per item
        what it would look up for fewer items than that. The default caches nothing."""
        return {}

    def first_hidden_all_items(self, batch: Batch, side: dict[str, torch.Tensor]) -> torch.Tensor:
        """z_0 of every query of `batch` (its history and profile; its item is ignored) against every item:
        [Q, M, d_0] with [q, m] = first_hidden(features(history_q, profile_q, item m + 1)). The default runs the
        Q·M expanded samples through `features`; a model overrides it to reuse `side` (`item_side()`)."""
        q, m = len(batch), self.num_items
        expanded = Batch(
            item=torch.arange(1, m + 1).repeat(q),
            history=batch.history.repeat_interleave(m, 0),
            profile=batch.profile.repeat_interleave(m, 0),
            label=torch.zeros(q * m),
        )
        return self.first_hidden(self.features(expanded)).view(q, m, -1)

    # ---------------------------------------------------------------- the shared top MLP

    def build_top_mlp(self, input_dim: int) -> None:
        """Create the top MLP input_dim → config.mlp_hidden → 1 (`hidden_layers`, `output_layer`). Parameter
        names `hidden_layers.{i}.*` and `output_layer.*` are part of the checkpoint format."""
        self.input_dim = input_dim
        sizes = [input_dim, *self.config.mlp_hidden]
        self.hidden_layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(sizes))
        self.output_layer = nn.Linear(sizes[-1], 1)

    @property
    def hidden_sizes(self) -> list[int]:
        """Widths d_l of the hidden layers MetaPatch patches."""
        return [layer.out_features for layer in self.hidden_layers]

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
        """Logits [N] of a batch."""
        return self.head(self.features(batch), patch)

    def head_parameter_names(self) -> list[str]:
        """Names of the top MLP's parameters, in `named_parameters` order."""
        return [n for n, _ in self.named_parameters() if n.startswith(("hidden_layers.", "output_layer."))]

    def functional_head(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """`head(x)` with the top MLP's parameters taken from `params` (by `head_parameter_names`), so a caller
        can train its own copy of the head (torch.func, per-device copies) without touching the module."""
        z = x
        for i in range(len(self.hidden_layers)):
            z = torch.relu(functional.linear(z, params[f"hidden_layers.{i}.weight"], params[f"hidden_layers.{i}.bias"]))
        return functional.linear(z, params["output_layer.weight"], params["output_layer.bias"]).squeeze(-1)

    def head_flops(self) -> float:
        """Forward FLOPs of the top MLP per sample (its matrix products)."""
        return float(mlp_flops([self.input_dim, *self.hidden_sizes, 1]))

    def first_hidden_flops(self) -> float:
        """Forward FLOPs of `first_hidden` per sample (what a CoDA candidate, arriving as x, costs)."""
        return float(mlp_flops([self.input_dim, self.hidden_sizes[0]]))

    @contextmanager
    def scoring_for_metrics(self, kept: dict[str, Any] | None = None) -> Iterator[None]:
        """Within it, scores feed metrics alone (evaluation), and a model may compute the same function faster, equal
        within float rounding, keeping what it derives from the weights in `kept` (DIN: attention logits from a
        table of every item pair). `kept` (default: a new dict) may be passed again to later scopes for as long as
        the weights stay as they are, and must then be replaced. What trains, gates or is sent stays on the exact
        path: a rounding difference there can flip a gate and move every later number."""
        previous = self.__dict__.get("_scoring_state")
        self.__dict__["_scoring_state"] = {} if kept is None else kept
        try:
            yield
        finally:
            self.__dict__["_scoring_state"] = previous

    @property
    def scoring_state(self) -> dict[str, Any] | None:
        """Within `scoring_for_metrics`, a dict for what the model keeps until its end; outside it, None."""
        return self.__dict__.get("_scoring_state")

    # ---------------------------------------------------------------- helpers for subclasses

    def check_items(self, batch: Batch) -> None:
        """Raise a clear error for item ids the model has no embedding for."""
        if len(batch) == 0:
            return
        low, high = int(batch.item.min()), max(int(batch.item.max()), int(batch.history.max()))
        if low < 1 or high > self.num_items:
            bad = high if high > self.num_items else low
            raise ValueError(f"item id {bad} is unknown to the model (valid ids: 1..{self.num_items})")
