"""A model's evaluation on the devices' evaluation samples: overall, per activity bucket and per device
(`evaluate`), the per-device columns a device host reports (`per_device_ranking`) and their pooling
(`summarize_devices`), the activity buckets and the evaluated sample of devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dccl_sim.metrics._inputs import _check_ids, _check_k, _check_labels_scores, _dense_codes
from dccl_sim.metrics.auc import _group_auc_ordered, _group_score_order, _single_group_auc, group_auc, pooled_gauc
from dccl_sim.metrics.ranking import (
    FULL,
    _per_device_hits,
    _ranks_from_codes,
    hit_rate_at_k,
    ndcg_at_k,
    positive_ranks,
    rank_metrics,
    ranking_names,
    with_prefix,
)
from dccl_sim.seeding import run_keys, seeded_generator


@dataclass(frozen=True)
class Metrics:
    """Metrics on one set of samples; `hr` and `ndcg` are at the cutoff `k` of the enclosing `Evaluation`, and
    `ranking` holds every cut-off's (`ranking_names`: "hr@K", "ndcg@K" for each K, and "mrr")."""

    auc: float
    gauc: float
    hr: float
    ndcg: float
    n_samples: int
    n_users: int
    ranking: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Metrics overall and per activity bucket (bucket 0 = least-active users, the tail), plus per device (ids
    sorted): AUC, HR@k and NDCG@k over its queries, its numbers of samples and queries."""

    overall: Metrics
    buckets: tuple[Metrics, ...]
    device_ids: np.ndarray
    device_auc: np.ndarray
    k: int
    device_ranking: dict[str, np.ndarray] = field(default_factory=dict)
    device_samples: np.ndarray | None = None
    device_queries: np.ndarray | None = None

    def of_devices(self, device_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Per-device columns of `device_ids` as `per_device_ranking` gives them (auc, every ranking metric,
        n_queries) and n_samples: NaN and 0 for devices that were not evaluated."""
        found, rows = self._rows(device_ids)
        sources = {"auc": self.device_auc, **self.device_ranking}
        out = {name: np.full(len(device_ids), np.nan) for name in sources}
        for name, values in {**sources, "n_samples": self.device_samples, "n_queries": self.device_queries}.items():
            out.setdefault(name, np.zeros(len(device_ids), dtype=np.int64))[found] = values[rows[found]]
        return out

    def _rows(self, device_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(self.device_ids) == 0:
            return np.zeros(len(device_ids), dtype=bool), np.zeros(len(device_ids), dtype=np.int64)
        rows = np.minimum(np.searchsorted(self.device_ids, device_ids), len(self.device_ids) - 1)
        return self.device_ids[rows] == device_ids, rows

    def auc_of(self, device_ids: np.ndarray) -> np.ndarray:
        """Per-device AUC of `device_ids`, NaN for devices that were not evaluated."""
        out = np.full(len(device_ids), np.nan)
        found, rows = self._rows(device_ids)
        out[found] = self.device_auc[rows[found]]
        return out

    def as_dict(self, prefix: str) -> dict[str, float]:
        """Flat metrics, e.g. for prefix "cloud" and k=10: cloud_auc, cloud_gauc, cloud_hr10, cloud_ndcg10 and the
        same for the tail bucket (bucket 0) as tail_cloud_auc, tail_cloud_gauc, tail_cloud_hr10, tail_cloud_ndcg10."""
        tail = self.buckets[0]
        out: dict[str, float] = {}
        for name, m in ((prefix, self.overall), (f"tail_{prefix}", tail)):
            out[f"{name}_auc"] = m.auc
            out[f"{name}_gauc"] = m.gauc
            out[f"{name}_hr{self.k}"] = m.hr
            out[f"{name}_ndcg{self.k}"] = m.ndcg
        return out


def evaluated_devices(seed: int, num_devices: int, cap: int | None) -> np.ndarray:
    """The devices whose metrics a run reports, sorted: all of them, or a seeded sample of `cap` that depends only
    on (seed, number of devices), so every round and every actor agree on it."""
    if cap is None or cap >= num_devices:
        return np.arange(num_devices, dtype=np.int64)
    rng = seeded_generator(*run_keys(seed, "eval_devices"))
    return np.sort(rng.choice(num_devices, size=cap, replace=False)).astype(np.int64)


def activity_buckets(activity: np.ndarray, quantiles: Sequence[float]) -> np.ndarray:
    """Bucket index (int64) of each user from its activity count, with edges e = np.quantile(activity, quantiles)
    (linear interpolation): bucket b holds e[b-1] < activity <= e[b], taking e[-1] = -inf and e[len] = +inf.
    So there are len(quantiles) + 1 buckets, bucket 0 holds the least-active users (the long tail), and a user
    exactly at an edge goes to the lower bucket. Quantiles must be strictly increasing within [0, 1]."""
    activity = np.asarray(activity)
    if activity.ndim != 1:
        raise ValueError(f"activity must be 1-D, got shape {activity.shape}")
    if np.issubdtype(activity.dtype, np.floating) and np.isnan(activity).any():
        raise ValueError("activity must not contain NaN")
    q = np.asarray(quantiles, dtype=np.float64)
    if q.ndim != 1 or ((q < 0) | (q > 1)).any() or (np.diff(q) <= 0).any():
        raise ValueError(f"quantiles must be strictly increasing values in [0, 1], got {list(quantiles)}")
    if len(activity) == 0:
        return np.empty(0, dtype=np.int64)
    edges = np.quantile(activity, q)
    # side="left" counts the edges strictly below each activity, which sends ties at an edge to the lower bucket.
    return np.searchsorted(edges, activity, side="left").astype(np.int64)


def evaluate(
    devices: np.ndarray,
    queries: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    bucket_of_device: np.ndarray,
    num_buckets: int,
    k: int = 10,
    ks: Sequence[int] = (),
    full_ranks: np.ndarray | None = None,
    full_queries: np.ndarray | None = None,
) -> Evaluation:
    """AUC over all samples pooled, GAUC grouped by device, and HR@k / NDCG@k over the queries (each one positive
    plus its sampled negatives, query ids unique across devices); the same again restricted to each activity bucket,
    a sample's bucket being bucket_of_device[device]. A bucket without samples gets NaN metrics and zero counts.

    With `full_ranks`, the full rank of the positive of each query of `full_queries` (every query once, any order),
    the ranking metrics at every cut-off are also given over those ranks as "full_hr@K", "full_ndcg@K", "full_mrr"."""
    y, s, dev, q = _check_labels_scores(labels, scores, devices=devices, queries=queries)
    _check_ids("devices", dev)
    _check_ids("queries", q)
    _check_k(k)
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be at least 1, got {num_buckets}")
    bucket_of_device = _check_ids("bucket_of_device", np.asarray(bucket_of_device))
    if bucket_of_device.ndim != 1:
        raise ValueError(f"bucket_of_device must be 1-D, got shape {bucket_of_device.shape}")
    if len(dev):
        if dev.min() < 0:
            raise ValueError("device ids must be non-negative")
        if dev.max() >= len(bucket_of_device):
            raise ValueError(f"bucket_of_device has {len(bucket_of_device)} entries but device {dev.max()} appears")
    sample_bucket = bucket_of_device[dev]
    if len(sample_bucket) and (sample_bucket.min() < 0 or sample_bucket.max() >= num_buckets):
        raise ValueError(f"device buckets must lie in 0..{num_buckets - 1}")

    unique_q, q_code = _dense_codes(q)
    query_device = np.empty(len(unique_q), dtype=dev.dtype)
    query_device[q_code] = dev
    if (query_device[q_code] != dev).any():
        raise ValueError("every query must belong to a single device")
    ranks = _ranks_from_codes(q_code, len(unique_q), y, s)
    full = None if full_ranks is None else _align_full_ranks(unique_q, full_ranks, full_queries)
    query_bucket = bucket_of_device[query_device]

    # One score sort serves the pooled AUC, each bucket's AUC (a masked subsequence stays sorted) and the
    # (device, score) order for per-device AUC.
    score_order = np.argsort(s)
    s_sorted, y_sorted, bucket_sorted = s[score_order], y[score_order], sample_bucket[score_order]
    per_device = _group_auc_ordered(dev, y, s, _group_score_order(dev, s, score_order))
    device_bucket = bucket_of_device[per_device.groups]

    def metrics(
        sample_mask: np.ndarray | None, device_mask: np.ndarray | None, query_mask: np.ndarray | None
    ) -> Metrics:
        ss, ys = (s_sorted, y_sorted) if sample_mask is None else (s_sorted[sample_mask], y_sorted[sample_mask])
        dev_auc, dev_n = (
            (per_device.auc, per_device.n_samples)
            if device_mask is None
            else (per_device.auc[device_mask], per_device.n_samples[device_mask])
        )
        r = ranks if query_mask is None else ranks[query_mask]
        ranking = rank_metrics(r, ks)
        if full is not None:
            ranking |= with_prefix(FULL, rank_metrics(full if query_mask is None else full[query_mask], ks))
        return Metrics(
            auc=_single_group_auc(ss, ys),
            gauc=pooled_gauc(dev_auc, dev_n),
            hr=hit_rate_at_k(r, k),
            ndcg=ndcg_at_k(r, k),
            n_samples=len(ss),
            n_users=len(dev_auc),
            ranking=ranking,
        )

    overall = metrics(None, None, None)
    buckets = tuple(metrics(bucket_sorted == b, device_bucket == b, query_bucket == b) for b in range(num_buckets))
    device_ranking, device_queries = _per_device_hits(ranks, query_device, per_device.groups, ks)
    if full is not None:
        device_ranking |= with_prefix(FULL, _per_device_hits(full, query_device, per_device.groups, ks)[0])
    return Evaluation(
        overall=overall,
        buckets=buckets,
        device_ids=per_device.groups,
        device_auc=per_device.auc,
        k=int(k),
        device_ranking=device_ranking,
        device_samples=per_device.n_samples,
        device_queries=device_queries,
    )


def _align_full_ranks(unique_q: np.ndarray, full_ranks: np.ndarray, full_queries: np.ndarray | None) -> np.ndarray:
    """`full_ranks` reordered to the sorted query ids `unique_q`; every query must have exactly one."""
    full_ranks = np.asarray(full_ranks, dtype=np.int64)
    if full_queries is None or len(full_queries) != len(full_ranks):
        raise ValueError("full_ranks needs full_queries, the query of each rank")
    order = np.argsort(full_queries, kind="stable")
    if len(order) != len(unique_q) or (np.asarray(full_queries)[order] != unique_q).any():
        raise ValueError("full_queries must hold every evaluated query exactly once")
    return full_ranks[order]


def per_device_ranking(
    devices: np.ndarray,
    queries: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    device_ids: np.ndarray,
    ks: Sequence[int],
) -> dict[str, np.ndarray]:
    """Per device of `device_ids` (sorted): AUC of its samples, every ranking metric (`ranking_names(ks)`) as the
    mean over its queries, and its number of queries; NaN (0 queries) for a device without samples. Samples are
    grouped into queries (one positive and its sampled negatives) by `queries`, ranked as `positive_ranks` does."""
    n_devices = len(device_ids)
    columns = {name: np.full(n_devices, np.nan) for name in ("auc", *ranking_names(ks))}
    columns["n_queries"] = np.zeros(n_devices, dtype=np.int64)
    if len(labels) == 0:
        return columns
    group = group_auc(devices, labels, scores)
    columns["auc"][np.searchsorted(device_ids, group.groups)] = group.auc
    ranks = positive_ranks(queries, labels, scores)
    unique_q, q_code = _dense_codes(np.asarray(queries))
    query_device = np.empty(len(unique_q), dtype=np.int64)
    query_device[q_code] = devices
    ranking, columns["n_queries"] = _per_device_hits(ranks, query_device, device_ids, ks)
    return columns | ranking


def summarize_devices(
    n_samples: np.ndarray, auc_: np.ndarray, n_queries: np.ndarray, ranking: dict[str, np.ndarray]
) -> dict[str, float]:
    """Pool per-device results into GAUC and each ranking metric without the scores.

    GAUC = Σ_u n_u · AUC_u / Σ_u n_u over devices with a defined AUC, n_u the device's samples (as `gauc`); a
    ranking metric is the mean over all queries, i.e. the per-device means weighted by each device's queries.
    """
    n_samples, n_queries = np.asarray(n_samples, dtype=np.float64), np.asarray(n_queries, dtype=np.float64)
    defined = np.isfinite(auc_)
    has_queries = n_queries > 0
    total_queries = n_queries[has_queries].sum()
    pooled = {"gauc": pooled_gauc(np.where(defined, auc_, np.nan), n_samples)}
    for name, values in ranking.items():
        weighted = (np.asarray(values)[has_queries] * n_queries[has_queries]).sum()
        pooled[name] = float(weighted / total_queries) if total_queries else float("nan")
    return pooled
