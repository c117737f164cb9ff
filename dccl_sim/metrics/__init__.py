"""Metrics for evaluating recommenders (docs/evaluation.md): AUC, per-user (group) AUC and GAUC (`auc`), HR@K,
NDCG@K and MRR from each positive's rank among sampled negatives or among every candidate item (`ranking`), and a
model's evaluation overall, per activity bucket and per device (`evaluation`).

Everything is vectorized numpy (no loop over users, groups or queries) so that 10^7 samples take seconds.
"""

from dccl_sim.metrics.auc import GroupAUC, auc, gauc, group_auc, pooled_gauc
from dccl_sim.metrics.evaluation import (
    Evaluation,
    Metrics,
    activity_buckets,
    evaluate,
    evaluated_devices,
    per_device_ranking,
    summarize_devices,
)
from dccl_sim.metrics.ranking import (
    FULL,
    hit_rate_at_k,
    ndcg_at_k,
    per_device_rank_metrics,
    positive_ranks,
    rank_metrics,
    ranking_names,
    with_prefix,
)

__all__ = [
    "FULL",
    "Evaluation",
    "GroupAUC",
    "Metrics",
    "activity_buckets",
    "auc",
    "evaluate",
    "evaluated_devices",
    "gauc",
    "group_auc",
    "hit_rate_at_k",
    "ndcg_at_k",
    "per_device_rank_metrics",
    "per_device_ranking",
    "pooled_gauc",
    "positive_ranks",
    "rank_metrics",
    "ranking_names",
    "summarize_devices",
    "with_prefix",
]
