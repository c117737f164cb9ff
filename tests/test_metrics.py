import math

import numpy as np
import pytest

from dccl_sim import metrics
from dccl_sim.metrics import (
    Evaluation,
    Metrics,
    activity_buckets,
    auc,
    evaluate,
    gauc,
    group_auc,
    hit_rate_at_k,
    ndcg_at_k,
    per_device_rank_metrics,
    per_device_ranking,
    positive_ranks,
    rank_metrics,
)

# ---------------------------------------------------------------- brute-force references


def brute_auc(labels, scores):
    pos = [s for y, s in zip(labels, scores, strict=True) if y == 1]
    neg = [s for y, s in zip(labels, scores, strict=True) if y == 0]
    if not pos or not neg:
        return float("nan")
    wins = 0.0
    for p in pos:
        for n in neg:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(pos) * len(neg))


def brute_group_auc(groups, labels, scores):
    ids = sorted(set(groups.tolist()))
    aucs, sizes = [], []
    for g in ids:
        m = groups == g
        aucs.append(brute_auc(labels[m], scores[m]))
        sizes.append(int(m.sum()))
    return np.array(ids), np.array(aucs), np.array(sizes)


def brute_gauc(groups, labels, scores):
    _, aucs, sizes = brute_group_auc(groups, labels, scores)
    num = den = 0.0
    for a, n in zip(aucs, sizes, strict=True):
        if not math.isnan(a):
            num += n * a
            den += n
    return num / den if den else float("nan")


def brute_ranks(queries, labels, scores):
    out = []
    for q in sorted(set(queries.tolist())):
        m = queries == q
        pos_score = scores[m & (labels == 1)][0]
        out.append(int(((scores >= pos_score) & m & (labels == 0)).sum()))
    return np.array(out)


def random_queries(rng, n_devices, max_queries, max_negatives, decimals=1):
    """Samples of devices 0..n_devices-1, each with 0..max_queries queries of one positive and 1..max_negatives
    negatives; scores rounded so that ties are frequent. Shuffled so that nothing relies on input order."""
    devices, queries, labels = [], [], []
    qid = 1000
    for d in range(n_devices):
        for _ in range(rng.integers(0, max_queries + 1)):
            m = int(rng.integers(1, max_negatives + 1))
            devices += [d] * (m + 1)
            queries += [qid] * (m + 1)
            labels += [1] + [0] * m
            qid += int(rng.integers(1, 4))
    devices, queries, labels = np.array(devices), np.array(queries), np.array(labels)
    scores = np.round(rng.random(len(labels)) * 0.5 + 0.3 * labels, decimals)
    perm = rng.permutation(len(labels))
    return devices[perm], queries[perm], labels[perm], scores[perm]


# ---------------------------------------------------------------- auc


def test_auc_hand_computed():
    # Positives 0.9 and 0.4 against negatives 0.1 and 0.5: pairs won 1 + 1 + 1 + 0 = 3 of 4.
    assert auc(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.4, 0.5])) == pytest.approx(0.75)


def test_auc_perfect_reversed_and_ties():
    labels = np.array([0, 0, 1, 1])
    assert auc(labels, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auc(labels, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert auc(labels, np.full(4, 0.7)) == 0.5
    # One positive tied with one of two negatives, above the other: (1 + 1/2) / 2.
    assert auc(np.array([1, 0, 0]), np.array([0.5, 0.5, 0.2])) == pytest.approx(0.75)


def test_auc_nan_when_a_class_is_missing():
    assert math.isnan(auc(np.array([1, 1]), np.array([0.1, 0.2])))
    assert math.isnan(auc(np.array([0, 0]), np.array([0.1, 0.2])))
    assert math.isnan(auc(np.array([], dtype=int), np.array([])))


def test_auc_matches_pairwise_brute_force_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 60))
        labels = rng.integers(0, 2, n)
        scores = np.round(rng.random(n), 1)
        np.testing.assert_allclose(auc(labels, scores), brute_auc(labels, scores), rtol=1e-12, equal_nan=True)


def test_auc_accepts_bool_labels_and_float32_scores():
    labels = np.array([True, False, True, False])
    scores = np.array([0.9, 0.1, 0.4, 0.5], dtype=np.float32)
    assert auc(labels, scores) == pytest.approx(0.75)


# ---------------------------------------------------------------- group auc / gauc


def test_gauc_hand_computed():
    # User 7 (3 samples): positive 0.8 beats negative 0.3, loses to 0.9 -> AUC 1/2.
    # User 2 (4 samples): positives 0.6, 0.2 vs negatives 0.4, 0.1 -> 3 of 4 pairs won -> AUC 3/4.
    # User 5 (2 samples): positives only -> NaN, left out of GAUC.
    # GAUC = (3 * 1/2 + 4 * 3/4) / (3 + 4) = 4.5 / 7.
    groups = np.array([7, 2, 7, 5, 2, 2, 7, 5, 2])
    labels = np.array([1, 1, 0, 1, 1, 0, 0, 1, 0])
    scores = np.array([0.8, 0.6, 0.3, 0.5, 0.2, 0.4, 0.9, 0.1, 0.1])
    result = group_auc(groups, labels, scores)
    np.testing.assert_array_equal(result.groups, [2, 5, 7])
    np.testing.assert_allclose(result.auc, [0.75, np.nan, 0.5], equal_nan=True)
    np.testing.assert_array_equal(result.n_samples, [4, 2, 3])
    assert result.auc.dtype == np.float64
    assert result.n_samples.dtype == np.int64
    assert gauc(groups, labels, scores) == pytest.approx(4.5 / 7)


def test_gauc_nan_when_no_group_has_both_classes():
    assert math.isnan(gauc(np.array([1, 2]), np.array([1, 0]), np.array([0.3, 0.4])))


def test_group_auc_empty():
    result = group_auc(np.array([], dtype=int), np.array([], dtype=int), np.array([]))
    assert len(result.groups) == len(result.auc) == len(result.n_samples) == 0


def test_group_auc_and_gauc_match_brute_force_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(10):
        n = int(rng.integers(1, 300))
        groups = rng.choice(np.array([-3, 0, 4, 9, 12, 100, 2**40]), n)
        labels = rng.integers(0, 2, n)
        scores = np.round(rng.random(n), 1)
        ids, aucs, sizes = brute_group_auc(groups, labels, scores)
        result = group_auc(groups, labels, scores)
        np.testing.assert_array_equal(result.groups, ids)
        np.testing.assert_allclose(result.auc, aucs, rtol=1e-12, equal_nan=True)
        np.testing.assert_array_equal(result.n_samples, sizes)
        np.testing.assert_allclose(gauc(groups, labels, scores), brute_gauc(groups, labels, scores), rtol=1e-12)


def test_group_auc_does_not_mix_groups_at_score_ties():
    # Same scores in two groups; each group alone is perfectly ranked.
    groups = np.array([1, 1, 2, 2])
    labels = np.array([1, 0, 1, 0])
    scores = np.array([0.5, 0.2, 0.7, 0.5])
    np.testing.assert_allclose(group_auc(groups, labels, scores).auc, [1.0, 1.0])


# ---------------------------------------------------------------- ranks, HR, NDCG


def test_positive_ranks_hand_computed_and_pessimistic_ties():
    queries = np.array([20, 10, 10, 20, 10, 20, 30, 30])
    labels = np.array([1, 0, 1, 0, 0, 0, 1, 0])
    scores = np.array([0.5, 0.9, 0.6, 0.5, 0.1, 0.2, 0.3, 0.1])
    # Query 10: positive 0.6, one negative above (0.9) -> 1. Query 20: positive 0.5 tied with a negative -> 1.
    # Query 30: positive above its only negative -> 0.
    np.testing.assert_array_equal(positive_ranks(queries, labels, scores), [1, 1, 0])
    constant = positive_ranks(queries, labels, np.zeros(8))
    np.testing.assert_array_equal(constant, [2, 2, 1])
    assert constant.dtype == np.int64


def test_positive_ranks_match_brute_force():
    rng = np.random.default_rng(2)
    _, queries, labels, scores = random_queries(rng, n_devices=15, max_queries=5, max_negatives=8)
    np.testing.assert_array_equal(positive_ranks(queries, labels, scores), brute_ranks(queries, labels, scores))


@pytest.mark.parametrize(
    "queries, labels",
    [
        (np.array([1, 1, 2, 2]), np.array([1, 0, 0, 0])),  # query 2 has no positive
        (np.array([1, 1, 2, 2]), np.array([1, 1, 1, 0])),  # query 1 has two
    ],
)
def test_positive_ranks_rejects_queries_without_exactly_one_positive(queries, labels):
    with pytest.raises(ValueError, match="exactly one positive"):
        positive_ranks(queries, labels, np.array([0.1, 0.2, 0.3, 0.4]))


def test_hr_and_ndcg_known_ranks():
    assert ndcg_at_k(np.array([0]), 10) == 1.0
    assert ndcg_at_k(np.array([1]), 10) == pytest.approx(1 / math.log2(3))
    ranks = np.array([0, 1, 4, 5, 50])
    assert hit_rate_at_k(ranks, 5) == pytest.approx(3 / 5)
    assert ndcg_at_k(ranks, 5) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 5)
    assert hit_rate_at_k(ranks, 1) == pytest.approx(1 / 5)
    assert ndcg_at_k(ranks, 1) == pytest.approx(1 / 5)


def test_hr_and_ndcg_nan_on_empty_and_reject_bad_k():
    assert math.isnan(hit_rate_at_k(np.array([], dtype=int), 10))
    assert math.isnan(ndcg_at_k(np.array([], dtype=int), 10))
    with pytest.raises(ValueError, match="k must be"):
        hit_rate_at_k(np.array([0]), 0)
    with pytest.raises(ValueError, match="k must be"):
        ndcg_at_k(np.array([0]), 2.5)


# ---------------------------------------------------------------- input validation


def test_mismatched_lengths_rejected():
    with pytest.raises(ValueError, match="same length"):
        auc(np.array([1, 0]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="same length"):
        group_auc(np.array([1, 1]), np.array([1, 0, 1]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="same length"):
        positive_ranks(np.array([1, 1, 1]), np.array([1, 0]), np.array([0.1, 0.2]))


def test_labels_outside_0_1_rejected():
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        auc(np.array([1, 2, 0]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        gauc(np.array([1, 1]), np.array([-1, 0]), np.array([0.1, 0.2]))


def test_nan_scores_rejected():
    with pytest.raises(ValueError, match="NaN"):
        auc(np.array([1, 0]), np.array([np.nan, 0.2]))


# ---------------------------------------------------------------- activity buckets


def test_activity_buckets_hand_computed():
    # Linear-interpolated quartile edges of 1..8 are 2.75 and 6.25.
    np.testing.assert_array_equal(activity_buckets(np.arange(1, 9), [0.25, 0.75]), [0, 0, 1, 1, 1, 1, 2, 2])
    # The median of 1..5 is 3, and a user exactly at an edge goes to the lower bucket.
    buckets = activity_buckets(np.array([5, 1, 3, 4, 2]), [0.5])
    np.testing.assert_array_equal(buckets, [1, 0, 0, 1, 0])
    assert buckets.dtype == np.int64
    # Ties: the median is 1, so every user with activity 1 is in the tail.
    np.testing.assert_array_equal(activity_buckets(np.array([1, 1, 1, 1, 2, 3, 10]), [0.5]), [0, 0, 0, 0, 1, 1, 1])


def test_activity_bucket_zero_is_least_active():
    rng = np.random.default_rng(3)
    activity = rng.geometric(0.02, 2000)
    buckets = activity_buckets(activity, [0.2, 0.5, 0.8])
    np.testing.assert_array_equal(np.unique(buckets), [0, 1, 2, 3])
    # Buckets never decrease as activity grows, so bucket 0 holds the least active users.
    assert (np.diff(buckets[np.argsort(activity, kind="stable")]) >= 0).all()
    assert buckets[activity == activity.min()].tolist() == [0] * int((activity == activity.min()).sum())
    assert activity[buckets == 0].max() < activity[buckets == 3].min()
    assert abs((buckets == 0).mean() - 0.2) < 0.02
    np.testing.assert_array_equal(buckets, activity_buckets(activity, [0.2, 0.5, 0.8]))


def test_activity_buckets_heavy_ties_leave_empty_buckets():
    # Half the users have activity 1, so the 0.2 and 0.4 edges are both 1: bucket 1 is empty, ties stay low.
    activity = np.array([1] * 10 + list(range(2, 12)))
    buckets = activity_buckets(activity, [0.2, 0.4])
    np.testing.assert_array_equal(buckets, [0] * 10 + [2] * 10)


def test_activity_buckets_rejects_bad_quantiles():
    with pytest.raises(ValueError, match="quantiles"):
        activity_buckets(np.arange(5), [0.5, 0.2])
    with pytest.raises(ValueError, match="quantiles"):
        activity_buckets(np.arange(5), [1.5])


# ---------------------------------------------------------------- evaluate


def _direct_metrics(devices, queries, labels, scores, k):
    ranks = positive_ranks(queries, labels, scores)
    return (
        auc(labels, scores),
        gauc(devices, labels, scores),
        hit_rate_at_k(ranks, k),
        ndcg_at_k(ranks, k),
        len(labels),
        len(np.unique(devices)),
    )


def _as_tuple(m: Metrics):
    return (m.auc, m.gauc, m.hr, m.ndcg, m.n_samples, m.n_users)


def test_evaluate_overall_and_buckets_match_metrics_on_subsets():
    rng = np.random.default_rng(4)
    devices, queries, labels, scores = random_queries(rng, n_devices=30, max_queries=6, max_negatives=9)
    # Bucket 3 is left empty on purpose; device 30 has a bucket but no samples.
    bucket_of_device = rng.integers(0, 3, 31)
    k = 3
    ev = evaluate(devices, queries, labels, scores, bucket_of_device, num_buckets=4, k=k)
    assert isinstance(ev, Evaluation)
    assert ev.k == k
    assert len(ev.buckets) == 4
    np.testing.assert_allclose(_as_tuple(ev.overall), _direct_metrics(devices, queries, labels, scores, k))
    for b in range(3):
        m = bucket_of_device[devices] == b
        assert m.any()
        np.testing.assert_allclose(
            _as_tuple(ev.buckets[b]), _direct_metrics(devices[m], queries[m], labels[m], scores[m], k), rtol=1e-12
        )
        # The bucket's metrics equal an evaluation of the bucket's samples alone.
        alone = evaluate(devices[m], queries[m], labels[m], scores[m], bucket_of_device, num_buckets=4, k=k)
        np.testing.assert_allclose(_as_tuple(alone.overall), _as_tuple(ev.buckets[b]), rtol=1e-12)
    empty = ev.buckets[3]
    assert all(math.isnan(x) for x in (empty.auc, empty.gauc, empty.hr, empty.ndcg))
    assert (empty.n_samples, empty.n_users) == (0, 0)
    # Per-device AUC against the brute force.
    ids, aucs, _ = brute_group_auc(devices, labels, scores)
    np.testing.assert_array_equal(ev.device_ids, ids)
    np.testing.assert_allclose(ev.device_auc, aucs, rtol=1e-12, equal_nan=True)


def test_evaluate_as_dict_keys_and_values():
    rng = np.random.default_rng(5)
    devices, queries, labels, scores = random_queries(rng, n_devices=10, max_queries=4, max_negatives=5)
    bucket_of_device = (np.arange(10) >= 5).astype(np.int64)
    ev = evaluate(devices, queries, labels, scores, bucket_of_device, num_buckets=2, k=10)
    d = ev.as_dict("cloud")
    assert set(d) == {
        "cloud_auc",
        "cloud_gauc",
        "cloud_hr10",
        "cloud_ndcg10",
        "tail_cloud_auc",
        "tail_cloud_gauc",
        "tail_cloud_hr10",
        "tail_cloud_ndcg10",
    }
    assert d["cloud_auc"] == ev.overall.auc
    assert d["cloud_hr10"] == ev.overall.hr
    assert d["tail_cloud_gauc"] == ev.buckets[0].gauc
    assert d["tail_cloud_ndcg10"] == ev.buckets[0].ndcg


def test_evaluate_validation():
    devices = np.array([0, 0, 1, 1])
    queries = np.array([1, 1, 2, 2])
    labels = np.array([1, 0, 1, 0])
    scores = np.array([0.3, 0.1, 0.2, 0.4])
    buckets = np.array([0, 1])
    with pytest.raises(ValueError, match="same length"):
        evaluate(devices[:3], queries, labels, scores, buckets, 2)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        evaluate(devices, queries, np.array([1, 0, 2, 0]), scores, buckets, 2)
    with pytest.raises(ValueError, match="bucket_of_device"):
        evaluate(devices, queries, labels, scores, np.array([0]), 2)
    with pytest.raises(ValueError, match="buckets must lie"):
        evaluate(devices, queries, labels, scores, np.array([0, 2]), 2)
    with pytest.raises(ValueError, match="single device"):
        evaluate(np.array([0, 1, 1, 1]), queries, labels, scores, buckets, 2)
    with pytest.raises(ValueError, match="exactly one positive"):
        evaluate(np.zeros(4, dtype=int), np.array([1, 1, 1, 1]), labels, scores, buckets, 2)


def test_auc_of_is_nan_for_devices_that_were_not_evaluated() -> None:
    labels = np.array([1, 0, 0, 1, 0, 0])
    scores = np.array([0.9, 0.1, 0.2, 0.1, 0.5, 0.6])
    devices = np.array([2, 2, 2, 5, 5, 5])
    queries = np.array([0, 0, 0, 1, 1, 1])
    evaluation = evaluate(devices, queries, labels, scores, np.zeros(7, dtype=np.int64), 1)
    np.testing.assert_array_equal(evaluation.auc_of(np.array([0, 2, 5, 6])), [np.nan, 1.0, 0.0, np.nan])


# ---------------------------------------------------------------- several cut-offs, MRR, per device, pooled


def test_ranking_metrics_at_several_cutoffs_by_hand() -> None:
    # three queries whose positives rank 0, 3 and 12 (0-based)
    ranks = np.array([0, 3, 12])
    got = metrics.rank_metrics(ranks, ks=(1, 5, 20))
    assert metrics.ranking_names((1, 5, 20)) == ["hr@1", "ndcg@1", "hr@5", "ndcg@5", "hr@20", "ndcg@20", "mrr"]
    assert got["hr@1"] == pytest.approx(1 / 3) and got["ndcg@1"] == pytest.approx(1 / 3)
    assert got["hr@5"] == pytest.approx(2 / 3)
    assert got["ndcg@5"] == pytest.approx((1 + 1 / math.log2(5)) / 3)  # 1/log2(0+2) + 1/log2(3+2)
    assert got["hr@20"] == pytest.approx(1.0)
    assert got["ndcg@20"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(14)) / 3)
    assert got["mrr"] == pytest.approx((1 + 1 / 4 + 1 / 13) / 3)
    assert math.isnan(metrics.rank_metrics(np.zeros(0, dtype=np.int64), ks=(5,))["mrr"])


def test_per_device_ranking_and_pooling_by_hand() -> None:
    # device 7: two queries (positive first, then last of 3); device 9: one query, positive second of 3
    devices = np.array([7, 7, 7, 7, 7, 7, 9, 9, 9])
    queries = np.array([1, 1, 1, 2, 2, 2, 3, 3, 3])
    labels = np.array([1, 0, 0, 1, 0, 0, 1, 0, 0])
    scores = np.array([0.9, 0.1, 0.2, 0.1, 0.5, 0.6, 0.5, 0.9, 0.1])
    got = metrics.per_device_ranking(devices, queries, labels, scores, np.array([5, 7, 9]), ks=(1, 2))
    assert np.isnan(got["auc"][0]) and got["n_queries"].tolist() == [0, 2, 1]
    # device 7's AUC: positives 0.9 and 0.1 against negatives 0.1, 0.2, 0.5, 0.6: 4 + 0.5 pairs of 8 (a tie is 1/2)
    assert got["auc"][1] == pytest.approx(4.5 / 8) and got["auc"][2] == pytest.approx(1 / 2)
    assert got["hr@1"][1:].tolist() == [0.5, 0.0] and got["hr@2"][1:].tolist() == [0.5, 1.0]
    assert got["mrr"][1] == pytest.approx((1 + 1 / 3) / 2) and got["mrr"][2] == pytest.approx(1 / 2)
    pooled = metrics.summarize_devices(np.array([0, 6, 3]), got["auc"], got["n_queries"], {"mrr": got["mrr"]})
    assert pooled["gauc"] == pytest.approx((6 * 4.5 / 8 + 3 * 0.5) / 9)  # weighted by samples, per the DIN paper
    assert pooled["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)  # every query counts once


# ---------------------------------------------------------------- metrics over ranks at several cut-offs


def test_rank_metrics_by_hand() -> None:
    ranks = np.array([0, 2, 5, 12])
    got = rank_metrics(ranks, ks=(1, 5, 10))
    # HR@K: ranks below K out of 4 queries
    assert got["hr@1"] == 1 / 4 and got["hr@5"] == 2 / 4 and got["hr@10"] == 3 / 4
    # NDCG@K: 1 / log2(r + 2) for the hits: r = 0 -> 1, r = 2 -> 1/2, r = 5 -> 1/log2(7)
    assert got["ndcg@1"] == pytest.approx(1 / 4)
    assert got["ndcg@5"] == pytest.approx((1 + 0.5) / 4)
    assert got["ndcg@10"] == pytest.approx((1 + 0.5 + 1 / math.log2(7)) / 4)
    # MRR: 1 / (r + 1), no cut-off
    assert got["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 6 + 1 / 13) / 4)
    assert set(got) == {"hr@1", "ndcg@1", "hr@5", "ndcg@5", "hr@10", "ndcg@10", "mrr"}
    for k in (1, 5, 10):
        assert got[f"hr@{k}"] == hit_rate_at_k(ranks, k) and got[f"ndcg@{k}"] == pytest.approx(ndcg_at_k(ranks, k))
    empty = rank_metrics(np.zeros(0, dtype=np.int64), ks=(10,))
    assert all(math.isnan(v) for v in empty.values())
    with pytest.raises(ValueError, match="negative"):
        rank_metrics(np.array([0, -1]))
    with pytest.raises(ValueError, match="positive integer"):
        rank_metrics(ranks, ks=(0,))
    with pytest.raises(ValueError, match="integer array"):
        rank_metrics(np.array([0.5]))


def test_per_device_rank_metrics_by_hand() -> None:
    ranks = np.array([0, 2, 5, 12, 1])
    query_device = np.array([3, 3, 7, 7, 3])
    got = per_device_rank_metrics(ranks, query_device, np.array([3, 5, 7]), ks=(2, 10))
    # device 3: ranks 0, 2, 1; device 5: no queries; device 7: ranks 5, 12
    np.testing.assert_array_equal(got["n_queries"], [3, 0, 2])
    np.testing.assert_allclose(got["hr@2"], [2 / 3, np.nan, 0.0])
    np.testing.assert_allclose(got["hr@10"], [1.0, np.nan, 1 / 2])
    np.testing.assert_allclose(got["ndcg@2"], [(1 + 1 / math.log2(3)) / 3, np.nan, 0.0])
    np.testing.assert_allclose(got["ndcg@10"], [(1 + 0.5 + 1 / math.log2(3)) / 3, np.nan, 1 / math.log2(7) / 2])
    np.testing.assert_allclose(got["mrr"], [(1 + 1 / 3 + 1 / 2) / 3, np.nan, (1 / 6 + 1 / 13) / 2])
    with pytest.raises(ValueError, match="one of device_ids"):
        per_device_rank_metrics(ranks, query_device, np.array([3, 5]))
    with pytest.raises(ValueError, match="same length"):
        per_device_rank_metrics(ranks[:2], query_device, np.array([3, 7]))


def test_per_device_rank_metrics_equal_per_device_ranking_on_sampled_queries() -> None:
    rng = np.random.default_rng(0)
    devices = np.repeat([0, 0, 1, 4, 4, 4], 5)  # 6 queries of 1 positive and 4 negatives
    queries = np.repeat(np.arange(6), 5)
    labels = np.tile([1, 0, 0, 0, 0], 6)
    scores = rng.integers(0, 4, size=30).astype(float)  # many ties
    ranks = positive_ranks(queries, labels, scores)
    device_ids = np.array([0, 1, 2, 4])
    old = per_device_ranking(devices, queries, labels, scores, device_ids, ks=(3,))
    new = per_device_rank_metrics(ranks, devices[::5], device_ids, ks=(3,))
    np.testing.assert_allclose(new["hr@3"], old["hr@3"])
    np.testing.assert_allclose(new["ndcg@3"], old["ndcg@3"])
    np.testing.assert_array_equal(new["n_queries"], old["n_queries"])


def test_evaluate_with_full_ranks_in_any_query_order() -> None:
    """Full ranks given per query in shuffled order land on their queries: overall, per bucket and per device they
    equal `rank_metrics` of the ranks of those queries; a missing or repeated query is refused."""
    rng = np.random.default_rng(7)
    devices, queries, labels, scores = random_queries(rng, n_devices=12, max_queries=5, max_negatives=4)
    bucket_of_device = np.arange(12) % 2
    query_ids = np.unique(queries)
    device_of_query = np.array([devices[queries == q][0] for q in query_ids])
    full = rng.integers(0, 40, len(query_ids))
    order = rng.permutation(len(query_ids))
    ev = evaluate(
        devices,
        queries,
        labels,
        scores,
        bucket_of_device,
        2,
        ks=(1, 5),
        full_ranks=full[order],
        full_queries=query_ids[order],
    )
    assert ev.overall.ranking["full_hr@5"] == pytest.approx(np.mean(full < 5))
    assert ev.overall.ranking["full_mrr"] == pytest.approx(np.mean(1.0 / (full + 1)))
    for b in (0, 1):
        mine = bucket_of_device[device_of_query] == b
        assert ev.buckets[b].ranking["full_ndcg@5"] == pytest.approx(rank_metrics(full[mine], (5,))["ndcg@5"])
    for row, device in enumerate(ev.device_ids):
        assert ev.device_ranking["full_hr@1"][row] == pytest.approx(np.mean(full[device_of_query == device] < 1))
    with pytest.raises(ValueError, match="every evaluated query exactly once"):
        evaluate(devices, queries, labels, scores, bucket_of_device, 2, full_ranks=full[1:], full_queries=query_ids[1:])
