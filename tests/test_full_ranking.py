"""Full-ranking evaluation on real ML-100K users with trained DIN and SASRec models: the exclusion rule, scores equal
to the model's own forward pass (plain and under meta-patches), ranks equal to a loop over items (ties included),
and the invariant full rank ≥ sampled rank, hence full HR@K ≤ sampled HR@K."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_RUN

from dccl_sim import metrics, plugins
from dccl_sim.algorithms.full_ranking import FullRanker, ranks_among_candidates
from dccl_sim.config import ModelConfig
from dccl_sim.data.candidates import exclusions
from dccl_sim.data.device_data import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID, Batch
from dccl_sim.models import din
from dccl_sim.models.base import ModelSpec, Recommender
from dccl_sim.models.metapatch import MetaPatch
from dccl_sim.models.training import fit, predict

L = 20
KS = (1, 5, 10, 20)


def _spec(built) -> ModelSpec:
    meta = built.meta
    return ModelSpec(meta.num_items, meta.num_categories, tuple(meta.profile_cardinalities), built.item_category)


@pytest.fixture(scope="module")
def trained(ml100k_small) -> dict[str, Recommender]:
    """DIN and SASRec after one epoch on the 60 users' training samples."""
    data = ml100k_small.data
    train = np.flatnonzero(data.split == SPLIT_TRAIN)
    models = {}
    for name in ("din", "sasrec"):
        torch.manual_seed(0)
        model = plugins.resolve(plugins.MODEL, name)(_spec(ml100k_small), ModelConfig())
        fit(model, data, train, epochs=1, batch_size=256, lr=3e-3, history_len=L, seed_keys=(0,))
        models[name] = model.eval()
    return models


def _queries(data, split: int) -> np.ndarray:
    return np.flatnonzero((data.split == split) & (data.label == 1))


def _expanded(batch: Batch, num_items: int) -> Batch:
    """Every query of `batch` against every item 1..M, as ordinary samples."""
    q = len(batch)
    return Batch(
        item=torch.arange(1, num_items + 1).repeat(q),
        history=batch.history.repeat_interleave(num_items, 0),
        profile=batch.profile.repeat_interleave(num_items, 0),
        label=torch.zeros(q * num_items),
    )


def _brute_excluded(data, index: int) -> set[int]:
    """E(u, s) minus the positive, by a loop over the user's positives: the items of splits up to the query's."""
    mine = np.flatnonzero((data.sample_device == data.sample_device[index]) & (data.label == 1))
    items = {int(data.item[i]) for i in mine if data.split[i] <= data.split[index]}
    return items - {int(data.item[index])}


def test_exclusions_are_the_users_items_up_to_the_querys_split(ml100k_small) -> None:
    data = ml100k_small.data
    queries = np.concatenate([_queries(data, SPLIT_VALID)[::7], _queries(data, SPLIT_TEST)[::7]])
    excluded = exclusions(data, queries)
    for i, index in enumerate(queries):
        assert set(excluded.of(i).tolist()) == _brute_excluded(data, index)
        # the sampled negatives of the query are candidates
        negatives = (data.sample_device == data.sample_device[index]) & (data.seq_pos == data.seq_pos[index])
        assert not np.isin(data.item[negatives & (data.label == 0)], excluded.of(i)).any()
    # a validation query keeps the user's test items as candidates; a test query excludes the user's valid items
    valid, test = queries[0], queries[-1]
    first_valid, last_test = 0, len(queries) - 1
    mine = (data.sample_device == data.sample_device[valid]) & (data.label == 1)
    user_test = data.item[mine & (data.split == SPLIT_TEST)]
    assert not np.isin(user_test, excluded.of(first_valid)).any() and len(user_test)
    mine = (data.sample_device == data.sample_device[test]) & (data.label == 1)
    user_valid = data.item[mine & (data.split == SPLIT_VALID)]
    assert np.isin(user_valid, excluded.of(last_test)).all() and len(user_valid)
    mask = excluded.mask(0, len(queries), ml100k_small.meta.num_items)
    assert mask.sum(1).tolist() == [len(excluded.of(i)) for i in range(len(queries))]
    with pytest.raises(ValueError, match="positive samples"):
        exclusions(data, np.flatnonzero(data.label == 0)[:3])


@pytest.mark.parametrize("name", ["din", "sasrec"])
def test_scores_equal_the_models_forward_plain_and_patched(ml100k_small, trained, name: str) -> None:
    data, model = ml100k_small.data, trained[name]
    m = ml100k_small.meta.num_items
    # a test and a validation query, and a user's first training positive (an empty history)
    first = np.flatnonzero((data.split == SPLIT_TRAIN) & (data.label == 1) & (data.seq_pos == 0))[0]
    indices = np.array([_queries(data, SPLIT_TEST)[3], _queries(data, SPLIT_VALID)[40], first])
    batch = data.batch(indices, L)
    ranker = FullRanker(model, history_len=L)
    with torch.no_grad():
        expected = model(_expanded(batch, m)).view(len(batch), m)
    got = ranker.scores(batch)
    assert expected.abs().max() > 1.0  # a trained model, not near-zero logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # the base class's definition (every pair through `features`) agrees too
    with torch.no_grad():
        definition = Recommender.first_hidden_all_items(model, batch, {})
    torch.testing.assert_close(model.first_hidden_all_items(batch, ranker.side), definition, rtol=0, atol=1e-5)

    torch.manual_seed(1)
    patch = MetaPatch(model.hidden_sizes, k=16, rank=16)
    theta = torch.randn(len(batch), 16)
    patched_ranker = FullRanker(model, patch, history_len=L)
    patched = patched_ranker.scores(batch, theta)
    with torch.no_grad():
        expected = model(_expanded(batch, m), patch.patch(theta.repeat_interleave(m, 0))).view(len(batch), m)
    assert (expected - got).abs().max() > 1e-2  # the patches change the scores
    torch.testing.assert_close(patched, expected, rtol=0, atol=1e-5)

    # several models on one W share z_0: the same ranks as ranking each alone
    mask = exclusions(data, indices).mask(0, len(indices), m)
    plain_ranks, patched_ranks = patched_ranker.ranks_many(data, indices, [None, theta])
    assert plain_ranks.tolist() == ranker.ranks(data, indices).tolist()
    assert plain_ranks.tolist() == ranks_among_candidates(got, batch.item, mask).tolist()
    assert patched_ranks.tolist() == ranks_among_candidates(patched, batch.item, mask).tolist()
    assert patched_ranks.tolist() != plain_ranks.tolist()


@pytest.mark.parametrize("attention_hidden", [(7, 5), ()])
def test_din_without_the_pair_table_and_with_other_attention_sizes(ml100k_small, monkeypatch, attention_hidden) -> None:
    data = ml100k_small.data
    torch.manual_seed(0)
    model = din.DIN(_spec(ml100k_small), ModelConfig(attention_hidden=attention_hidden)).eval()
    batch = data.batch(_queries(data, SPLIT_TEST)[[0, 1, 2, 200]], L)
    with torch.no_grad():
        expected = model(_expanded(batch, model.num_items)).view(len(batch), -1)
    with_table = FullRanker(model, history_len=L)
    monkeypatch.setattr(din, "PAIR_TABLE_MAX", 0)
    monkeypatch.setattr(din, "PAIR_BLOCK", 5000)  # several blocks of history items
    without = FullRanker(model, history_len=L)
    assert "attention" in with_table.side and "attention" not in without.side
    for ranker in (with_table, without):
        torch.testing.assert_close(ranker.scores(batch), expected, rtol=0, atol=1e-5)


def test_ranks_equal_a_loop_over_items_ties_included(ml100k_small, trained) -> None:
    data, model = ml100k_small.data, trained["din"]
    m = ml100k_small.meta.num_items
    queries = np.concatenate([_queries(data, SPLIT_TEST)[::40], _queries(data, SPLIT_VALID)[::40]])
    ranker = FullRanker(model, history_len=L, chunk_pairs=3 * m)  # chunks of 3 queries
    batch = data.batch(queries, L)
    scores = ranker.scores(batch)
    coarse = torch.round(scores * 4) / 4  # quarter steps: many ties, the positive's included
    excluded = exclusions(data, queries)
    mask = excluded.mask(0, len(queries), m)
    brute, brute_coarse = [], []
    for q, index in enumerate(queries):
        skip = _brute_excluded(data, index)
        positive = int(data.item[index])
        for values, out in ((scores, brute), (coarse, brute_coarse)):
            s = values[q].tolist()
            pos = s[positive - 1]
            out.append(sum(1 for j in range(1, m + 1) if j != positive and j not in skip and s[j - 1] >= pos))
    assert ranks_among_candidates(scores, batch.item, mask).tolist() == brute
    assert ranks_among_candidates(coarse, batch.item, mask).tolist() == brute_coarse
    assert brute_coarse != brute  # the ties counted against the positive made a difference
    assert ranker.ranks(data, queries).tolist() == brute
    with pytest.raises(ValueError, match="positive item is among its excluded"):
        ranks_among_candidates(scores, batch.item, mask | True)


@pytest.mark.parametrize("name", ["din", "sasrec"])
def test_full_rank_is_never_better_than_the_sampled_rank(ml100k_small, trained, name: str) -> None:
    data, model = ml100k_small.data, trained[name]
    test = np.flatnonzero(data.split == SPLIT_TEST)
    queries = test[data.label[test] == 1]
    ranker = FullRanker(model, history_len=L)
    full = ranker.ranks(data, queries)
    # the same scores: the sampled negatives' scores taken from the full score matrix
    batch = data.batch(queries, L)
    scores = ranker.scores(batch)
    query_of = np.searchsorted(queries, test, side="right") - 1
    same = scores[torch.from_numpy(query_of), torch.from_numpy(data.item[test].astype(np.int64) - 1)]
    sampled_same = metrics.positive_ranks(data.query_ids(test), data.label[test], same.numpy())
    assert (full >= sampled_same).all() and (full > sampled_same).mean() > 0.9
    # the model's own scores of the stored samples, as today's sampled evaluation computes them
    sampled = metrics.positive_ranks(data.query_ids(test), data.label[test], predict(model, data, test, history_len=L))
    full_metrics, sampled_metrics = metrics.rank_metrics(full, KS), metrics.rank_metrics(sampled, KS)
    for k in KS:
        assert full_metrics[f"hr@{k}"] <= sampled_metrics[f"hr@{k}"]
        assert full_metrics[f"ndcg@{k}"] <= sampled_metrics[f"ndcg@{k}"]
    assert full_metrics["mrr"] < sampled_metrics["mrr"]
    # a model that learned something: chance is 10/20 sampled (19 negatives) and about 20/1,600 in full
    assert sampled_metrics["hr@10"] > 0.7 and full_metrics["hr@20"] > 0.05
    device = metrics.per_device_rank_metrics(full, data.sample_device[queries], data.device_ids, KS)
    assert np.isclose(np.nansum(device["hr@10"] * device["n_queries"]) / len(queries), full_metrics["hr@10"])


# ---------------------------------------------------------------- full ranking in the round loop (metrics.ranking)

ROUND_SETTINGS = [*TINY_RUN, "rounds=2", "runtime.backend=local"]
MODELS = ("broadcast", "start", "device", "cloud")


def _rounds(out_dir, *settings: str) -> dict[str, np.ndarray]:
    from dccl_sim import load_config
    from dccl_sim.runtime.session import run

    run(load_config(None, [*ROUND_SETTINGS, f"output.out_dir={out_dir}", *settings]))
    return {name: np.array(values, dtype=float) for name, values in _read(out_dir / "rounds.parquet").items()}


def _read(path) -> dict[str, list]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return {name: values for name, values in table.to_pydict().items() if name != "strategy"}


@pytest.mark.parametrize("strategy", ["cloud_only", "metapatch", "dccl", "fedavg", "local_finetune"])
def test_rounds_rank_fully_beside_the_sampled_metrics(tmp_path, strategy: str) -> None:
    """`metrics.ranking=both`: every model's full HR/NDCG/MRR at every cut-off, never above the sampled value; the
    start model of all but dccl is the broadcast model (taken from the cloud's ranking of it); round 1's
    broadcast is round 0's cloud model; the personalized models rank differently from it."""
    rounds = _rounds(tmp_path, f"strategy={strategy}", "metrics.ranking=both")
    names = metrics.ranking_names((5, 10, 20))
    for prefix in (*MODELS, *(f"tail_{m}" for m in MODELS)):
        for name in names:
            full, sampled = rounds[f"{prefix}_full_{name}"], rounds[f"{prefix}_{name}"]
            assert np.isfinite(full).all(), f"{prefix}_full_{name}"
            assert (full <= sampled + 1e-12).all(), f"{prefix}_full_{name} {full} > sampled {sampled}"
    assert (rounds["cloud_full_hr@20"] < rounds["cloud_hr@20"]).any()  # 9 sampled negatives vs 1,682 items
    for name in names:
        if strategy != "dccl":  # dccl starts from its starting meta-patches θ̃, ranked on the devices
            assert rounds[f"start_full_{name}"] == pytest.approx(rounds[f"broadcast_full_{name}"], abs=1e-12)
        assert rounds[f"broadcast_full_{name}"][1] == pytest.approx(rounds[f"cloud_full_{name}"][0], abs=1e-12)
    personalized = not np.allclose(rounds["device_full_mrr"], rounds["start_full_mrr"], atol=1e-9)
    assert personalized == (strategy != "cloud_only")


def test_ranking_full_reports_full_ranking_alone_and_sampled_none(tmp_path) -> None:
    full = _rounds(tmp_path / "full", "rounds=1", "metrics.ranking=full")
    assert "cloud_full_ndcg@10" in full and "tail_device_full_mrr" in full
    assert not any(name.endswith(("hr@10", "mrr")) and "_full_" not in name for name in full)
    assert np.isnan(full["cloud_hr10"]).all() and np.isnan(full["device_ndcg10"]).all()  # the sampled aliases
    sampled = _rounds(tmp_path / "sampled", "rounds=1")
    assert not any("_full_" in name for name in sampled)
    assert sampled["cloud_hr10"] == pytest.approx(sampled["cloud_hr@10"])
    # the same cloud model either way: full ranking only adds columns
    assert full["cloud_gauc"] == pytest.approx(sampled["cloud_gauc"], abs=1e-12)
    # the report shows what the run measured: full-ranking rows and per-bucket values, no sampled ranking rows
    from dccl_sim.report import write_report

    text = write_report(tmp_path / "full").read_text()
    assert "device full NDCG@10" in text and "every item its user has not interacted with" in text
    assert "device HR@10" not in text and "device NDCG@10 |" not in text


def test_device_hosts_rank_as_the_cloud_host_does(tmp_path) -> None:
    """The broadcast model ranked on a device host (under all-zero meta-patches, and as a parameter copy of itself)
    gives each device the full-ranking metrics the cloud host's evaluation of the same model gives it."""
    from dccl_sim import load_config
    from dccl_sim.data.prepare import prepare_dataset
    from dccl_sim.hosts.cloud import CloudHost
    from dccl_sim.hosts.device import DeviceHost

    config = load_config(None, [*ROUND_SETTINGS, "metrics.ranking=both", "strategy=metapatch"])
    root = str(prepare_dataset(config.data, config.seed))
    cloud = CloudHost(config, root)
    ids = np.arange(config.data.num_devices)
    device = DeviceHost(config, root, ids)
    broadcast = cloud.broadcast(0, ids)
    device.load(broadcast)
    evaluation = device.eval_samples(ids)
    (patched,) = device.full_ranks(evaluation, [torch.zeros(len(ids), config.patch.k)])
    copies = [device.full_ranks_with(evaluation, row, dict(device.models.cloud.state_dict())) for row in ids]
    expected = cloud.evaluate().device_ranking
    positives = evaluation.indices[device.data.label[evaluation.indices] == 1]
    for ranks in (patched, np.concatenate(copies)):
        got = metrics.per_device_rank_metrics(ranks, device.data.sample_device[positives], ids, (5, 10, 20))
        for name in metrics.ranking_names((5, 10, 20)):
            np.testing.assert_allclose(got[name], expected[f"full_{name}"], atol=1e-12, err_msg=name)


def test_per_device_ranking_columns_pool_to_the_round_metrics(tmp_path) -> None:
    """devices.parquet holds each device's queries and HR/NDCG at metrics.k for every model, sampled and full;
    pooled over all devices by their queries they give the round's own values, and per bucket 0 its tail values."""
    from dccl_sim.report import bucket_ranking

    rounds = _rounds(tmp_path, "strategy=metapatch", "metrics.ranking=both", "runtime.participation=1.0")
    devices = {name: np.array(values) for name, values in _read(tmp_path / "devices.parquet").items()}
    for t in (0, 1):
        for model in ("broadcast", "device", "cloud"):
            for name in ("hr@10", "full_ndcg@10"):
                pooled = bucket_ranking(devices, t, f"{model}_{name}", 4)
                assert pooled[-1] == pytest.approx(rounds[f"{model}_{name}"][t], abs=1e-9), (t, model, name)
                assert pooled[0] == pytest.approx(rounds[f"tail_{model}_{name}"][t], abs=1e-9, nan_ok=True)
