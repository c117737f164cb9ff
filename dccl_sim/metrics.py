"""Ranking metrics for evaluating recommenders: AUC, per-user (group) AUC and GAUC, HR@k and NDCG@k.

Everything is vectorized numpy (no loop over users, groups or queries) so that 10^7 samples take seconds.
Score ties are handled exactly: AUC counts a tied positive/negative pair as 1/2 (average ranks), while the
rank of a positive among its sampled negatives counts ties against the positive (pessimistic).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dccl_sim.seeding import run_keys, seeded_generator

__all__ = [
    "Evaluation",
    "GroupAUC",
    "Metrics",
    "activity_buckets",
    "auc",
    "evaluate",
    "gauc",
    "group_auc",
    "hit_rate_at_k",
    "ndcg_at_k",
    "per_device_rank_metrics",
    "positive_ranks",
    "rank_metrics",
]


@dataclass(frozen=True, eq=False)
class GroupAUC:
    """Per-group AUC: `auc[i]` and `n_samples[i]` belong to group id `groups[i]` (ids sorted ascending)."""

    groups: np.ndarray
    auc: np.ndarray
    n_samples: np.ndarray


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


def _check_labels_scores(labels: np.ndarray, scores: np.ndarray, **others: np.ndarray) -> tuple[np.ndarray, ...]:
    """Validated 1-D arrays: labels as int64 in {0,1}, scores as float64 without NaN, the others unchanged."""
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    arrays = {"labels": labels, "scores": scores, **{k: np.asarray(v) for k, v in others.items()}}
    for name, a in arrays.items():
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have the same length, got {lengths}")
    if not ((labels == 0) | (labels == 1)).all():
        bad = np.unique(labels[(labels != 0) & (labels != 1)])[:5]
        raise ValueError(f"labels must be 0 or 1, found {bad.tolist()}")
    if not np.issubdtype(scores.dtype, np.number) or np.issubdtype(scores.dtype, np.complexfloating):
        raise ValueError(f"scores must be real numbers, got dtype {scores.dtype}")
    # float64 keeps the order and the ties of float32 and of integers up to 2**53.
    scores = scores.astype(np.float64, copy=False)
    if np.isnan(scores).any():
        raise ValueError("scores must not contain NaN")
    rest = tuple(arrays[name] for name in others)
    return (labels.astype(np.int64), scores, *rest)


def _check_ids(name: str, ids: np.ndarray) -> np.ndarray:
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be integer ids, got dtype {ids.dtype}")
    return ids


def _dense_codes(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique ids, index of each element's id in them), skipping the sort when ids are already sorted."""
    if len(ids) == 0 or (ids[1:] >= ids[:-1]).all():
        new = np.empty(len(ids), dtype=bool)
        new[:1] = True
        new[1:] = ids[1:] != ids[:-1]
        return ids[new], np.cumsum(new) - 1
    return np.unique(ids, return_inverse=True)


def _auc_presorted(s: np.ndarray, y: np.ndarray, group_start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-group AUC and size from samples sorted by (group, score); `group_start` flags each group's first sample.

    Mann-Whitney per group: AUC = (R_pos - P(P+1)/2) / (P N), R_pos the sum of the positives' 1-based ranks
    within the group, tied scores taking the average rank of their run. Computed on twice the ranks so that
    everything stays in exact int64 arithmetic until the final division.
    """
    n = len(s)
    if n == 0:
        return np.empty(0, dtype=np.float64), np.empty(0, dtype=np.int64)
    new_run = group_start.copy()
    new_run[1:] |= s[1:] != s[:-1]
    run_starts = np.flatnonzero(new_run)
    run_ends = np.append(run_starts[1:], n)
    group_starts = np.flatnonzero(group_start)
    run_opens_group = group_start[run_starts]
    run_group_start = group_starts[np.cumsum(run_opens_group) - 1]
    cum_pos = np.concatenate(([0], np.cumsum(y)))
    pos_per_run = cum_pos[run_ends] - cum_pos[run_starts]
    # Twice the average 1-based rank within the group of a run covering global positions [start, end).
    twice_rank = run_starts + run_ends + 1 - 2 * run_group_start
    twice_rank_sum = np.add.reduceat(pos_per_run * twice_rank, np.flatnonzero(run_opens_group))
    n_samples = np.diff(np.append(group_starts, n))
    n_pos = cum_pos[np.append(group_starts[1:], n)] - cum_pos[group_starts]
    n_neg = n_samples - n_pos
    numerator = twice_rank_sum - n_pos * (n_pos + 1)
    denominator = 2 * n_pos * n_neg
    auc_ = np.full(len(group_starts), np.nan)
    ok = denominator > 0
    auc_[ok] = numerator[ok] / denominator[ok]
    return auc_, n_samples


def _single_group_auc(s_sorted: np.ndarray, y_sorted: np.ndarray) -> float:
    start = np.zeros(len(s_sorted), dtype=bool)
    start[:1] = True
    values, _ = _auc_presorted(s_sorted, y_sorted, start)
    return float(values[0]) if len(values) else float("nan")


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney rank sum: (R_pos - P(P+1)/2) / (P N), where P and N count positives and
    negatives and R_pos sums the positives' 1-based score ranks, tied scores sharing their average rank
    (so a tied positive/negative pair counts 1/2). NaN when either class is missing."""
    y, s = _check_labels_scores(labels, scores)
    order = np.argsort(s)
    return _single_group_auc(s[order], y[order])


def _group_score_order(groups: np.ndarray, s: np.ndarray, score_order: np.ndarray | None = None) -> np.ndarray:
    """Permutation sorting by (group, score); two passes (score, then stable by group) beat np.lexsort."""
    if score_order is None:
        score_order = np.argsort(s)
    return score_order[np.argsort(groups[score_order], kind="stable")]


def _group_auc_ordered(groups: np.ndarray, y: np.ndarray, s: np.ndarray, order: np.ndarray) -> GroupAUC:
    g_sorted = groups[order]
    start = np.empty(len(g_sorted), dtype=bool)
    start[:1] = True
    start[1:] = g_sorted[1:] != g_sorted[:-1]
    values, n_samples = _auc_presorted(s[order], y[order], start)
    return GroupAUC(groups=g_sorted[start], auc=values, n_samples=n_samples.astype(np.int64))


def group_auc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> GroupAUC:
    """AUC of every group g separately: (R_pos,g - P_g(P_g+1)/2) / (P_g N_g) with ranks taken within the group
    and ties averaged, as in `auc`. Groups are arbitrary integer ids in any order; the result lists them sorted,
    with NaN AUC for groups lacking positives or negatives."""
    y, s, g = _check_labels_scores(labels, scores, groups=groups)
    _check_ids("groups", g)
    return _group_auc_ordered(g, y, s, _group_score_order(g, s))


def pooled_gauc(auc_: np.ndarray, n_samples: np.ndarray) -> float:
    """GAUC from per-group AUCs: Σ n_g · AUC_g / Σ n_g over the groups with a defined AUC (NaN if none)."""
    ok = ~np.isnan(auc_)
    total = n_samples[ok].sum()
    if total == 0:
        return float("nan")
    return float((n_samples[ok] * auc_[ok]).sum() / total)


def gauc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Group AUC: sum_g n_g * AUC_g / sum_g n_g over the groups g having both classes, n_g the group's sample
    count. NaN when no group has both classes."""
    per_group = group_auc(groups, labels, scores)
    return pooled_gauc(per_group.auc, per_group.n_samples)


def _ranks_from_codes(query_code: np.ndarray, n_queries: int, y: np.ndarray, s: np.ndarray) -> np.ndarray:
    is_pos = y == 1
    n_pos = np.bincount(query_code[is_pos], minlength=n_queries)
    if (n_pos != 1).any():
        bad = np.flatnonzero(n_pos != 1)
        raise ValueError(
            f"every query needs exactly one positive; {len(bad)} of {n_queries} do not "
            f"(query indices {bad[:5].tolist()} have {n_pos[bad[:5]].tolist()} positives)"
        )
    pos_score = np.empty(n_queries, dtype=np.float64)
    pos_score[query_code[is_pos]] = s[is_pos]
    beats_positive = ~is_pos & (s >= pos_score[query_code])
    return np.bincount(query_code[beats_positive], minlength=n_queries).astype(np.int64)


def positive_ranks(queries: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """0-based rank of each query's single positive among that query's negatives, per query in sorted id order:
    rank_q = #{negatives j of q : score_j >= score_pos(q)}. Ties count against the positive, so a constant
    scorer ranks every positive last. Raises ValueError when a query does not have exactly one positive."""
    y, s, q = _check_labels_scores(labels, scores, queries=queries)
    _check_ids("queries", q)
    unique_q, code = _dense_codes(q)
    return _ranks_from_codes(code, len(unique_q), y, s)


def _check_k(k: int) -> None:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def hit_rate_at_k(ranks: np.ndarray, k: int) -> float:
    """HR@k = mean over queries of [rank < k] (ranks 0-based). NaN when there are no ranks."""
    _check_k(k)
    ranks = np.asarray(ranks)
    if len(ranks) == 0:
        return float("nan")
    return float((ranks < k).mean())


def ndcg_at_k(ranks: np.ndarray, k: int) -> float:
    """NDCG@k with one relevant item per query = mean over queries of 1/log2(rank + 2) if rank < k else 0
    (ranks 0-based). NaN when there are no ranks."""
    _check_k(k)
    ranks = np.asarray(ranks)
    if len(ranks) == 0:
        return float("nan")
    hit = ranks < k
    gains = np.zeros(len(ranks), dtype=np.float64)
    gains[hit] = 1.0 / np.log2(ranks[hit] + 2.0)
    return float(gains.mean())


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


# the prefix of full-ranking metrics: "full_hr@10" ranks among every candidate item, "hr@10" among sampled negatives
FULL = "full_"


def with_prefix(prefix: str, values: dict) -> dict:
    return {f"{prefix}{name}": value for name, value in values.items()}


def ranking_names(ks: Sequence[int], full: bool = False) -> list[str]:
    """The ranking metrics reported for the cut-offs `ks`: "hr@K" and "ndcg@K" for each K, then "mrr"; with `full`,
    the same again prefixed "full_" (full ranking)."""
    sampled = [f"{metric}@{k}" for k in ks for metric in ("hr", "ndcg")] + ["mrr"]
    return sampled + [FULL + name for name in sampled] if full else sampled


def _per_device_hits(
    ranks: np.ndarray, query_device: np.ndarray, device_ids: np.ndarray, ks: Sequence[int]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(every ranking metric per device, each device's number of queries): `per_device_rank_metrics` split."""
    out = per_device_rank_metrics(np.asarray(ranks, dtype=np.int64), query_device, device_ids, ks)
    return out, out.pop("n_queries")


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


def _rank_gains(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Each query's contribution to every metric of `rank_metrics`, keyed as there: [r < K], [r < K] / log2(r + 2)
    and 1 / (r + 1), as float64 arrays over the queries."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must be a 1-D integer array, got shape {ranks.shape} and dtype {ranks.dtype}")
    if len(ranks) and ranks.min() < 0:
        raise ValueError("ranks are 0-based and must not be negative")
    r = ranks.astype(np.float64)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        _check_k(k)
        hit = r < k
        out[f"hr@{k}"] = hit.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(r + 2.0), 0.0)
    out["mrr"] = 1.0 / (r + 1.0)
    return out


def rank_metrics(ranks: np.ndarray, ks: Sequence[int] = (5, 10, 20)) -> dict[str, float]:
    """Ranking metrics over Q queries from each positive's 0-based rank r_q among its candidates (sampled or full;
    ties already counted against the positive, as `positive_ranks` and full ranking do), for every cut-off K in ks:

        HR@K   = (1/Q) Σ_q [r_q < K]
        NDCG@K = (1/Q) Σ_q [r_q < K] / log2(r_q + 2)     (one relevant item per query, so the ideal DCG is 1)
        MRR    = (1/Q) Σ_q 1 / (r_q + 1)                 (no cut-off)

    Keys "hr@K", "ndcg@K" for each K, and "mrr"; every value is NaN when there are no queries."""
    gains = _rank_gains(ranks, ks)
    return {name: float(g.mean()) if len(g) else float("nan") for name, g in gains.items()}


def per_device_rank_metrics(
    ranks: np.ndarray, query_device: np.ndarray, device_ids: np.ndarray, ks: Sequence[int] = (5, 10, 20)
) -> dict[str, np.ndarray]:
    """`rank_metrics` per device of `device_ids` (sorted): each metric is the mean over the device's own queries,
    e.g. HR@K_u = (1/Q_u) Σ_{q of u} [r_q < K], with "n_queries" = Q_u; NaN (and 0 queries) for a device without
    queries. `query_device[q]` is the device of query q; every one must be in `device_ids`. The population value is
    the per-device mean weighted by Q_u (`summarize_devices`), not the plain mean over devices."""
    query_device = _check_ids("query_device", np.asarray(query_device))
    device_ids = np.asarray(device_ids)
    gains = _rank_gains(ranks, ks)
    if len(query_device) != len(np.asarray(ranks)):
        raise ValueError(f"ranks and query_device must have the same length, got {len(ranks)} and {len(query_device)}")
    rows = np.searchsorted(device_ids, query_device)
    if len(query_device) and (rows.max() >= len(device_ids) or (device_ids[rows] != query_device).any()):
        raise ValueError("every query's device must be one of device_ids")
    count = np.bincount(rows, minlength=len(device_ids))
    has = count > 0
    out: dict[str, np.ndarray] = {}
    for name, g in gains.items():
        column = np.full(len(device_ids), np.nan)
        column[has] = np.bincount(rows, weights=g, minlength=len(device_ids))[has] / count[has]
        out[name] = column
    out["n_queries"] = count.astype(np.int64)
    return out
