"""The long-tail generator: determinism, the RawDataset contract, and that each knob does what it says."""

from __future__ import annotations

import dataclasses
from functools import cache

import numpy as np
import pytest

from dccl_sim.config import SyntheticConfig
from dccl_sim.data.raw import DataError, RawDataset
from dccl_sim.data.synthetic import EPOCH_START, _popularity_table, generate_synthetic

N = 2000
ITEMS = 500


def config(**overrides) -> SyntheticConfig:
    return SyntheticConfig(num_items=ITEMS, **overrides)


@cache
def dataset(seed: int = 0, **overrides) -> RawDataset:
    return generate_synthetic(config(**overrides), N, seed)


def counts(ds: RawDataset) -> np.ndarray:
    return np.bincount(ds.user_id, minlength=len(ds.user_ids))


def category_histograms(ds: RawDataset, mask: np.ndarray | None = None) -> np.ndarray:
    """Per user, how many of their (masked) interactions fall in each item category."""
    mask = np.ones(len(ds.user_id), dtype=bool) if mask is None else mask
    hist = np.zeros((len(ds.user_ids), ds.num_categories))
    np.add.at(hist, (ds.user_id[mask], ds.item_category[ds.item_id[mask]]), 1)
    return hist


def mean_pairwise_cosine(vectors: np.ndarray) -> float:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    total, n = unit.sum(axis=0), len(unit)
    return float((total @ total - n) / (n * (n - 1)))


def early_late_cosine(ds: RawDataset, min_count: int = 15) -> float:
    """Mean cosine between a user's category histograms of their first and last third (users with many events)."""
    c = counts(ds)
    first = np.cumsum(c) - c
    rel = (np.arange(len(ds.user_id)) - first[ds.user_id]) / (c[ds.user_id] - 1)
    early, late = category_histograms(ds, rel <= 1 / 3), category_histograms(ds, rel >= 2 / 3)
    keep = c >= min_count
    early, late = early[keep], late[keep]
    cos = (early * late).sum(axis=1) / (np.linalg.norm(early, axis=1) * np.linalg.norm(late, axis=1))
    return float(cos.mean())


def test_same_seed_gives_identical_arrays_and_another_seed_others():
    a, b = generate_synthetic(config(), N, 7), generate_synthetic(config(), N, 7)
    for f in ("user_id", "item_id", "timestamp", "item_ids", "item_category", "user_ids"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert a.profiles.keys() == b.profiles.keys()
    for name in a.profiles:
        np.testing.assert_array_equal(a.profiles[name], b.profiles[name])
    c = generate_synthetic(config(), N, 8)
    assert not np.array_equal(a.item_category, c.item_category)
    assert len(a.item_id) != len(c.item_id) or not np.array_equal(a.item_id, c.item_id)
    assert not np.array_equal(a.timestamp[:100], c.timestamp[:100])


def test_shapes_ranges_and_contract():
    ds = dataset()
    assert isinstance(ds, RawDataset) and ds.name == "synthetic"
    dataclasses.replace(ds)  # re-runs RawDataset validation
    n = len(ds.user_id)
    assert len(ds.item_id) == len(ds.timestamp) == n > 0
    for arr in (ds.user_id, ds.item_id, ds.timestamp, ds.item_ids, ds.item_category, ds.user_ids):
        assert arr.dtype == np.int64
    np.testing.assert_array_equal(ds.user_ids, np.arange(N))
    np.testing.assert_array_equal(ds.item_ids, np.arange(ITEMS))
    assert np.isin(ds.item_id, ds.item_ids).all()
    assert set(np.unique(ds.user_id)) == set(range(N))  # every device has interactions
    assert ds.num_categories == 20
    assert len(np.unique(ds.item_category)) == 20  # all categories used (balanced)
    assert ds.profile_cardinalities == {"segment": 16, "age_group": 6, "region": 10}
    for name, codes in ds.profiles.items():
        assert codes.dtype == np.int64 and len(codes) == N
        assert len(np.unique(codes)) == ds.profile_cardinalities[name]


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_items": 3, "mean_interactions": 3.0},
        {"candidates_per_choice": 1, "activity_sigma": 0.0, "zipf_exponent": 0.0},
        {"num_items": 7, "num_categories": 1, "num_clusters": 1, "latent_dim": 1, "drift": 0.0},
        {"num_items": 40, "zipf_exponent": 4.0, "mean_interactions": 40.0, "personal_deviation": 0.0},
    ],
)
def test_edge_configs_still_give_valid_data(overrides):
    ds = generate_synthetic(SyntheticConfig(**overrides), 300, 1)
    assert counts(ds).min() >= 3
    keys = ds.user_id * len(ds.item_ids) + ds.item_id
    assert len(np.unique(keys)) == len(keys)
    assert (np.diff(ds.timestamp)[np.diff(ds.user_id) == 0] > 0).all()


def test_bad_arguments_raise_data_error():
    with pytest.raises(DataError, match="num_devices"):
        generate_synthetic(config(), 0, 0)
    with pytest.raises(DataError, match="num_items"):
        generate_synthetic(SyntheticConfig(num_items=2), 10, 0)


def test_items_never_repeat_for_a_user():
    crowded = generate_synthetic(SyntheticConfig(num_items=12, mean_interactions=8, zipf_exponent=2), N, 3)
    assert counts(crowded).max() == 6  # users at the cap hold half of all items
    for ds in (dataset(), crowded):
        keys = ds.user_id * len(ds.item_ids) + ds.item_id
        assert len(np.unique(keys)) == len(keys)


def test_activity_is_heavy_tailed_with_at_least_three_each():
    c = counts(dataset())
    assert c.min() >= 3
    assert c.max() <= ITEMS // 2
    assert abs(c.mean() - 20.0) < 2.0
    assert np.median(c) < 0.8 * c.mean()
    assert c.max() > 8 * np.median(c)
    assert (c < c.mean()).mean() > 0.6  # most users have fewer than the mean
    flat = counts(dataset(activity_sigma=0.0))
    assert flat.max() - flat.min() <= 1  # sigma 0: everyone gets the mean


def test_item_popularity_is_skewed_by_zipf():
    def top_decile_share(ds: RawDataset) -> float:
        per_item = np.sort(np.bincount(ds.item_id, minlength=ITEMS))[::-1]
        return per_item[: ITEMS // 10].sum() / per_item.sum()

    assert top_decile_share(dataset()) > 0.3
    assert top_decile_share(dataset(zipf_exponent=0.0)) < 0.2


@pytest.mark.parametrize("exponent", [0.0, 1.0, 3.0])
def test_popularity_table_matches_the_distribution(exponent):
    p = 1.0 / np.arange(1, 1001) ** exponent
    p /= p.sum()
    table = _popularity_table(p)
    size = len(table)
    assert size & (size - 1) == 0  # a power of two: a slot is the top bits of a random word
    share = np.bincount(table, minlength=1000) / size
    assert share.min() > 0  # every item can be a candidate
    assert 0.5 * np.abs(share - p).sum() < 1000 / size  # total variation
    big = p * size >= 100
    assert np.abs(share[big] / p[big] - 1).max() < 0.02


def test_personal_deviation_spreads_users_of_a_cluster_apart():
    # One cluster: with no personal deviation every user has the same preference, so their category mixes agree.
    shared = mean_pairwise_cosine(category_histograms(dataset(num_clusters=1, personal_deviation=0.0)))
    personal = mean_pairwise_cosine(category_histograms(dataset(num_clusters=1, personal_deviation=3.0)))
    assert shared > personal + 0.15


def test_timestamps_strictly_increase_within_each_user():
    ds = dataset()
    same_user = np.diff(ds.user_id) == 0
    assert (np.diff(ds.user_id) >= 0).all()  # user by user
    assert (np.diff(ds.timestamp)[same_user] > 0).all()
    assert ds.timestamp.min() >= EPOCH_START


def test_drift_makes_late_behaviour_differ_from_early():
    assert early_late_cosine(dataset(drift=0.0)) > early_late_cosine(dataset(drift=5.0)) + 0.05


def test_profiles_are_tied_to_the_cluster():
    def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
        joint = np.zeros((a.max() + 1, b.max() + 1))
        np.add.at(joint, (a, b), 1)
        joint /= joint.sum()
        outer = joint.sum(axis=1, keepdims=True) * joint.sum(axis=0, keepdims=True)
        nz = joint > 0
        return float((joint[nz] * np.log(joint[nz] / outer[nz])).sum())

    p = dataset().profiles
    # age_group is strongly tied to the (true) cluster, region weakly; segment is a noisy copy of the cluster.
    assert mutual_information(p["segment"], p["age_group"]) > 2 * mutual_information(p["segment"], p["region"])
    # users of one segment behave alike: their category mixes agree more than those of random users
    ds = dataset(personal_deviation=0.0)
    hist, seg = category_histograms(ds), ds.profiles["segment"]
    within = np.mean([mean_pairwise_cosine(hist[seg == s]) for s in range(16)])
    assert within > mean_pairwise_cosine(hist) + 0.05
