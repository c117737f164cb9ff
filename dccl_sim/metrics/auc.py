"""AUC, per-group AUC and GAUC (docs/evaluation.md).

Ties are handled exactly: a tied positive/negative pair counts 1/2 (average ranks). GAUC weights each user's AUC by
the user's evaluation samples, as in the DIN paper (RecBole's GAUC weights by positives instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dccl_sim.metrics._inputs import _check_ids, _check_labels_scores


@dataclass(frozen=True, eq=False)
class GroupAUC:
    """Per-group AUC: `auc[i]` and `n_samples[i]` belong to group id `groups[i]` (ids sorted ascending)."""

    groups: np.ndarray
    auc: np.ndarray
    n_samples: np.ndarray


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
