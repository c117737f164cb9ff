"""Validation of the metric functions' inputs, shared by the AUC and ranking modules."""

from __future__ import annotations

import numpy as np


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


def _check_k(k: int) -> None:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
