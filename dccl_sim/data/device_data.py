"""Samples of a set of devices as NumPy columns, and the model batches cut from them.

Each device's item sequence is stored once (`seq_items`, in time order, delimited by `seq_offsets`); a
sample points at its position in that sequence (`seq_pos`) and its history — the last L items before it —
is derived by index when a batch is built, never copied into every sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST = 0, 1, 2
SPLIT_NAMES = ("train", "valid", "test")
PRETRAIN_WINDOW = -1
QUERY_POS_BITS = 24  # a query id packs (device id, sequence position); positions stay below 2**24


@dataclass(frozen=True)
class Batch:
    """Model input for N samples: target items, right-aligned histories (0 = padding), profile codes."""

    item: torch.Tensor  # [N] int64, 1..num_items
    history: torch.Tensor  # [N, L] int64, most recent last
    profile: torch.Tensor  # [N, F] int64
    label: torch.Tensor  # [N] float32

    def __len__(self) -> int:
        return int(self.item.shape[0])


@dataclass(frozen=True)
class DeviceData:
    """Sequences, profiles and samples of the devices `device_ids` (sorted global ids).

    Samples are sorted by (device, split, seq_pos) with each positive before its negatives.
    """

    device_ids: np.ndarray  # [D] int64
    seq_offsets: np.ndarray  # [D + 1] int64
    seq_items: np.ndarray  # [sum of sequence lengths] int32
    n_train: np.ndarray  # [D] int32: training interactions per device (positives only)
    profile: np.ndarray  # [D, F] int64
    sample_device: np.ndarray  # [S] int64 global device id
    item: np.ndarray  # [S] int32
    label: np.ndarray  # [S] int8
    seq_pos: np.ndarray  # [S] int32
    split: np.ndarray  # [S] int8
    timestamp: np.ndarray  # [S] int64

    @property
    def num_devices(self) -> int:
        return len(self.device_ids)

    @property
    def num_samples(self) -> int:
        return len(self.item)

    def rows_of(self, device_ids: np.ndarray) -> np.ndarray:
        """Local row (0..D-1) of each given global device id; raises KeyError for devices not held."""
        rows = np.searchsorted(self.device_ids, device_ids)
        rows = np.minimum(rows, len(self.device_ids) - 1)
        if len(device_ids) and not np.array_equal(self.device_ids[rows], device_ids):
            missing = np.setdiff1d(device_ids, self.device_ids)
            raise KeyError(f"devices not held here: {missing[:5].tolist()}")
        return rows

    @property
    def sample_row(self) -> np.ndarray:
        """Local row of each sample's device. Samples are sorted by device, so the rows follow from each device's
        sample count (D binary searches instead of S)."""
        left = np.searchsorted(self.sample_device, self.device_ids, side="left")
        counts = np.searchsorted(self.sample_device, self.device_ids, side="right") - left
        if counts.sum() != self.num_samples or np.any(np.diff(self.sample_device) < 0):
            return self.rows_of(self.sample_device)  # unsorted or foreign samples: the general path (and its error)
        return np.repeat(np.arange(self.num_devices), counts)

    def query_ids(self, indices: np.ndarray | None = None) -> np.ndarray:
        """One id per (device, position): a positive and the negatives sampled for it share it."""
        idx = slice(None) if indices is None else indices
        return (self.sample_device[idx] << QUERY_POS_BITS) | self.seq_pos[idx].astype(np.int64)

    def windows(self, rounds: int, pretrain_frac: float) -> np.ndarray:
        """Per-sample time window (docs/design.md §4): -1 pretraining, 0..rounds-1 a round's window, `rounds` for
        validation and test samples. A device's first `pretrain_frac` of training interactions pretrain the
        cloud; the rest are cut into `rounds` equal windows by position."""
        out = np.full(self.num_samples, rounds, dtype=np.int16)
        train = np.flatnonzero(self.split == SPLIT_TRAIN)  # a small share of the samples at 99 eval negatives
        n_train = self.n_train[self.sample_row[train]].astype(np.int64)
        n_pre = np.floor(pretrain_frac * n_train).astype(np.int64)
        span = np.maximum(n_train - n_pre, 1)
        pos = self.seq_pos[train].astype(np.int64)
        out[train] = np.where(pos < n_pre, PRETRAIN_WINDOW, ((pos - n_pre) * rounds) // span)
        return out

    def batch(self, indices: np.ndarray, history_len: int) -> Batch:
        """Build the model batch of the samples `indices`, deriving histories from the sequences."""
        indices = np.asarray(indices, dtype=np.int64)
        rows = self.rows_of(self.sample_device[indices])
        pos = self.seq_pos[indices].astype(np.int64)
        offsets = np.arange(-history_len, 0, dtype=np.int64)
        hist_pos = pos[:, None] + offsets[None, :]
        valid = hist_pos >= 0
        flat = self.seq_offsets[rows][:, None] + np.maximum(hist_pos, 0)
        history = np.where(valid, self.seq_items[flat], 0)
        return Batch(
            item=torch.from_numpy(self.item[indices].astype(np.int64)),
            history=torch.from_numpy(history.astype(np.int64)),
            profile=torch.from_numpy(self.profile[rows]),
            label=torch.from_numpy(self.label[indices].astype(np.float32)),
        )

    def subset(self, device_ids: np.ndarray) -> DeviceData:
        """The same data restricted to `device_ids` (sorted, all held here)."""
        device_ids = np.asarray(device_ids, dtype=np.int64)
        rows = self.rows_of(device_ids)
        lengths = np.diff(self.seq_offsets)[rows]
        seq_index = index_ranges(self.seq_offsets[rows], lengths)
        keep = np.isin(self.sample_device, device_ids)
        return DeviceData(
            device_ids=device_ids,
            seq_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            seq_items=self.seq_items[seq_index],
            n_train=self.n_train[rows],
            profile=self.profile[rows],
            sample_device=self.sample_device[keep],
            item=self.item[keep],
            label=self.label[keep],
            seq_pos=self.seq_pos[keep],
            split=self.split[keep],
            timestamp=self.timestamp[keep],
        )


def index_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated aranges [start, start + length) without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    shift = np.repeat(starts - (ends - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift
