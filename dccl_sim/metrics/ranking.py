"""Ranking metrics from each evaluated positive's rank among its candidates (its sampled negatives, or every item
the user has not interacted with under full ranking): HR@K, NDCG@K and MRR, pooled and per device
(docs/evaluation.md). A candidate scored equal to the positive counts against it (pessimistic ties).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dccl_sim.metrics._inputs import _check_ids, _check_k, _check_labels_scores, _dense_codes

# the prefix of full-ranking metrics: "full_hr@10" ranks among every candidate item, "hr@10" among sampled negatives
FULL = "full_"


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


def ranking_names(ks: Sequence[int], full: bool = False) -> list[str]:
    """The ranking metrics reported for the cut-offs `ks`: "hr@K" and "ndcg@K" for each K, then "mrr"; with `full`,
    the same again prefixed "full_" (full ranking)."""
    sampled = [f"{metric}@{k}" for k in ks for metric in ("hr", "ndcg")] + ["mrr"]
    return sampled + [FULL + name for name in sampled] if full else sampled


def with_prefix(prefix: str, values: dict) -> dict:
    return {f"{prefix}{name}": value for name, value in values.items()}


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


def _per_device_hits(
    ranks: np.ndarray, query_device: np.ndarray, device_ids: np.ndarray, ks: Sequence[int]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(every ranking metric per device, each device's number of queries): `per_device_rank_metrics` split."""
    out = per_device_rank_metrics(np.asarray(ranks, dtype=np.int64), query_device, device_ids, ks)
    return out, out.pop("n_queries")
