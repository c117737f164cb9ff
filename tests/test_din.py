"""The DIN-style cloud model: shapes, masking, the attention decomposition, unknown items, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dccl_sim import metrics
from dccl_sim.config import ModelConfig
from dccl_sim.data.device_data import SPLIT_TEST, SPLIT_TRAIN, Batch
from dccl_sim.models import din
from dccl_sim.models.base import ModelSpec
from dccl_sim.models.din import DIN, HistoryPositions, gather_rows
from dccl_sim.models.training import fit, predict


def _model(num_items: int = 20, seed: int = 0, **config) -> DIN:
    torch.manual_seed(seed)
    category = np.arange(num_items + 1) % 4
    return DIN(ModelSpec(num_items, 4, (2, 3), category), ModelConfig(**config))


def _batch(n: int = 6, length: int = 5, num_items: int = 20) -> Batch:
    generator = torch.Generator().manual_seed(1)
    history = torch.randint(1, num_items + 1, (n, length), generator=generator)
    history[0] = 0  # no history at all
    history[1, :3] = 0  # partly padded
    return Batch(
        item=torch.randint(1, num_items + 1, (n,), generator=generator),
        history=history,
        profile=torch.stack([torch.arange(n) % 2, torch.arange(n) % 3], dim=1),
        label=(torch.arange(n) % 2).float(),
    )


def test_shapes_and_hidden_layers() -> None:
    model = _model(mlp_hidden=(16, 8), embed_dim=8, profile_dim=4)
    batch = _batch()
    x = model.features(batch)
    assert x.shape == (6, 3 * 8 + 2 * 4)
    assert model.hidden_sizes == [16, 8]
    assert model(batch).shape == (6,)
    assert torch.isfinite(model(batch)).all()  # an empty history pools to zero, not NaN


def test_an_empty_batch_scores_to_an_empty_tensor(layout: str) -> None:
    model = _model()
    full = _batch()
    empty = Batch(item=full.item[:0], history=full.history[:0], profile=full.profile[:0], label=full.label[:0])
    assert model(empty).shape == (0,)
    assert model.features(empty).shape[0] == 0


def _attention_by_concatenation(model: DIN, batch: Batch, *, dense: bool = False) -> torch.Tensor:
    """The attention MLP on [e_h, e_t, e_h - e_t, e_h * e_t] at every position ([N, L] if `dense`), or at the
    valid ones in row-major order."""
    table = model.item_table()
    target, history = table[batch.item], table[batch.history]
    t = target.unsqueeze(1).expand_as(history)
    hidden = torch.cat([history, t, history - t, history * t], dim=-1)
    for layer in model.attention_layers:
        hidden = torch.relu(layer(hidden))
    logits = model.attention_out(hidden).squeeze(-1)
    return logits if dense else logits[batch.history > 0]


def _features_by_definition(model: DIN, batch: Batch) -> torch.Tensor:
    """x = [pooled, e_t, pooled * e_t, profiles] with the attention MLP on the concatenation at every position."""
    table = model.item_table()
    history, target = table[batch.history], table[batch.item]
    logits = _attention_by_concatenation(model, batch, dense=True).masked_fill(batch.history == 0, float("-inf"))
    pooled = torch.einsum("nl,nld->nd", torch.softmax(logits, dim=1).nan_to_num(0.0), history)
    profiles = [embedding(batch.profile[:, i]) for i, embedding in enumerate(model.profile_embeddings)]
    return torch.cat([pooled, target, pooled * target, *profiles], dim=1)


def test_features_equal_the_masked_softmax_over_every_position(layout: str) -> None:
    """Scoring only the valid positions is the definition's masked softmax over all L, in value and gradient."""
    model = _model(attention_hidden=(7,))
    batch = _batch()
    expected = _features_by_definition(model, batch)
    got = model.features(batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    d = model.item_embedding.embedding_dim
    assert torch.equal(got[0, :d], torch.zeros(d))  # the empty history pools to zero
    parameters = list(model.parameters())
    for a, b in zip(
        torch.autograd.grad(got.square().sum(), parameters, allow_unused=True),
        torch.autograd.grad(expected.square().sum(), parameters, allow_unused=True),
        strict=True,
    ):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_scoring_for_metrics_reads_the_pair_table_built_in_its_scope() -> None:
    """Scoring for metrics, once the positions scored in the scope reach PAIR_BUILD_SHARE of the pair table's
    entries, reads the attention logits from the table: the same features. The table lives for one scope, so
    weights changed between scopes are never scored with a stale one; outside a scope, the exact path only."""
    model = _model(attention_hidden=(7,))
    batch = _batch(n=40)  # 200 positions; the table has 21 · 20 = 420 entries, built from 210 scored positions on
    with torch.no_grad():
        expected = _features_by_definition(model, batch)
        assert model.scoring_state is None
        with model.scoring_for_metrics():
            torch.testing.assert_close(model.features(batch), expected, rtol=1e-5, atol=1e-6)
            assert "pairs" not in model.scoring_state  # 200 positions scored: not yet
            torch.testing.assert_close(model.features(batch), expected, rtol=1e-5, atol=1e-6)
            table = model.scoring_state["pairs"]
            assert table.shape == (21, 20)
            torch.testing.assert_close(model.features(batch), expected, rtol=1e-5, atol=1e-6)
            saved = table.clone()
            table.normal_()  # the features are read from it
            assert not torch.allclose(model.features(batch), expected, atol=1e-3)
            table.copy_(saved)
        assert model.scoring_state is None

        model.attention_out.bias.add_(0.5)  # as an optimizer's step would (fused Adam leaves no version trace)
        model.item_embedding.weight[3].mul_(2.0)
        changed = _features_by_definition(model, batch)
        assert not torch.allclose(changed, expected, atol=1e-3)
        torch.testing.assert_close(model.features(batch), changed, rtol=1e-5, atol=1e-6)
        kept: dict = {}  # one dict over several scopes: the positions add up, the table is kept
        for scope in range(3):
            with model.scoring_for_metrics(kept):
                torch.testing.assert_close(model.features(batch), changed, rtol=1e-5, atol=1e-6)
            assert ("pairs" in kept) == (scope > 0)
            if scope == 1:
                table = kept["pairs"]
        assert kept["pairs"] is table


@pytest.fixture(params=["dense", "ragged"])
def layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Score every history position, or only the non-padding ones, whatever the share of padding."""
    monkeypatch.setattr(din, "RAGGED_BELOW", 0.0 if request.param == "dense" else 1.01)
    return request.param


def _attention(model: DIN, batch: Batch) -> torch.Tensor:
    """The model's attention logits, at the valid (non-padding) positions in row-major order."""
    table = model.item_table()
    positions = HistoryPositions.of(batch.history)
    logits = model._attention_logits(table, positions, table[positions.item], table[batch.item])
    return logits[batch.history.reshape(-1) > 0] if positions.flat is None else logits


# 22 valid positions, more than the 21 items (projected per item); 2, fewer
@pytest.mark.parametrize("samples", [6, 2])
def test_attention_equals_the_mlp_on_the_concatenation(samples: int, layout: str) -> None:
    model = _model(attention_hidden=(7, 5))
    batch = _batch(samples)
    expected = _attention_by_concatenation(model, batch)
    torch.testing.assert_close(_attention(model, batch), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the in-place path
        torch.testing.assert_close(_attention(model, batch), expected.detach(), rtol=1e-5, atol=1e-6)
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad((_attention(model, batch) * weights).sum(), list(model.parameters()), allow_unused=True)
    want = torch.autograd.grad(
        (expected * weights).sum(), list(model.parameters()), allow_unused=True, retain_graph=True
    )
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gather_rows_equals_indexing_in_value_and_gradient() -> None:
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(7, 3, generator=generator, requires_grad=True)
    index = torch.tensor([[0, 6, 6], [2, 0, 6]])  # repeated rows must accumulate
    upstream = torch.randn(2, 3, 3, generator=generator)
    gathered = gather_rows(table, index)
    assert torch.equal(gathered, table[index])
    (grad,) = torch.autograd.grad((gathered * upstream).sum(), table)
    (expected,) = torch.autograd.grad((table[index] * upstream).sum(), table)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)
    assert torch.equal(grad[[1, 3, 4, 5]], torch.zeros(4, 3))


def test_padding_positions_do_not_change_the_output(layout: str) -> None:
    model = _model()
    batch = _batch()
    longer = Batch(
        item=batch.item,
        history=torch.cat([torch.zeros(6, 4, dtype=torch.int64), batch.history], dim=1),
        profile=batch.profile,
        label=batch.label,
    )
    torch.testing.assert_close(model(batch), model(longer))


def test_head_patch_sees_every_hidden_layer() -> None:
    model = _model(mlp_hidden=(16, 8))
    seen = []

    def patch(index: int, z: torch.Tensor) -> torch.Tensor:
        seen.append((index, z.shape[1]))
        return z

    x = model.features(_batch())
    torch.testing.assert_close(model.head(x, patch), model.head(x))
    assert seen == [(0, 16), (1, 8)]


def test_unknown_items_are_a_clear_error() -> None:
    model = _model(num_items=20)
    batch = _batch()
    bad = Batch(item=batch.item.clone(), history=batch.history, profile=batch.profile, label=batch.label)
    bad.item[2] = 21
    with pytest.raises(ValueError, match="item id 21 is unknown to the model"):
        model(bad)


def test_training_on_ml100k_users_beats_chance(ml100k_small) -> None:
    built = ml100k_small
    data = built.data
    torch.manual_seed(0)
    meta = built.meta
    model = DIN(ModelSpec(meta.num_items, meta.num_categories, tuple(meta.profile_cardinalities), built.item_category))
    train = np.flatnonzero(data.split == SPLIT_TRAIN)
    test = np.flatnonzero(data.split == SPLIT_TEST)
    losses = fit(model, data, train, epochs=3, batch_size=256, lr=3e-3, history_len=20, seed_keys=(0,))
    assert losses[-1] < losses[0]
    scores = predict(model, data, test, history_len=20)
    assert metrics.auc(data.label[test], scores) > 0.7
