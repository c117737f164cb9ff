"""The candidates of full-ranking evaluation: which items a query's positive is ranked against.

A query is one evaluated positive: device u's interaction with item p at sequence position t, of split s (validation
or test). Its candidates are every item 1..M except the items the user interacted with up to the end of split s,
plus p itself:

    candidates(q) = {1..M} \\ E(u, s)  ∪  {p},     E(u, s) = {items of u's sequence at positions < end(u, s)}

where end(u, s) is the number of u's interactions of splits ≤ s. So a test query excludes all of the user's training
and validation items and the user's other test positives; a validation query excludes the training items and the
other validation positives, and keeps the test items (the future) as candidates. This is RecBole's full-sort rule:
for a phase it masks the user's items of the earlier phases (its "history") and ranks all of the phase's positives
in one query, so no positive counts as another one's negative. The positive is always a candidate, even when the
user also interacted with its item elsewhere in the sequence.

The sampled negatives (docs/design.md §2) are items the user never touched at all, so they are candidates of every
query: a positive's full rank is never better than its sampled rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dccl_sim.data.device_data import SPLIT_NAMES, DeviceData, index_ranges


@dataclass(frozen=True)
class Exclusions:
    """E(u, s) of each query, as CSR rows shared by the queries of one (device, split): query i excludes
    `items[offsets[row[i]] : offsets[row[i] + 1]]` (an item may repeat) except its own `positive[i]`."""

    offsets: np.ndarray  # [R + 1] int64
    items: np.ndarray  # [nnz] int64, item ids 1..M
    row: np.ndarray  # [Q] int64, the row of each query
    positive: np.ndarray  # [Q] int64, each query's positive item

    def __len__(self) -> int:
        return len(self.row)

    def of(self, query: int) -> np.ndarray:
        """The sorted distinct items query `query` excludes (its positive is not among them)."""
        r = self.row[query]
        excluded = np.unique(self.items[self.offsets[r] : self.offsets[r + 1]])
        return excluded[excluded != self.positive[query]]

    def mask(self, start: int, stop: int, num_items: int) -> torch.Tensor:
        """[stop - start, M] bool, True where query start + i excludes item m + 1 (column m holds item m + 1)."""
        rows = self.row[start:stop]
        lengths = self.offsets[rows + 1] - self.offsets[rows]
        items = self.items[index_ranges(self.offsets[rows], lengths)]
        query = np.repeat(np.arange(len(rows)), lengths)
        out = torch.zeros(len(rows), num_items + 1, dtype=torch.bool)
        out[torch.from_numpy(query), torch.from_numpy(items)] = True
        out[torch.arange(len(rows)), torch.from_numpy(self.positive[start:stop])] = False
        return out[:, 1:]


def exclusions(data: DeviceData, query_indices: np.ndarray) -> Exclusions:
    """E(u, s) of the queries whose positives are the samples `query_indices` of `data` (validation or test
    positives, in any order); see the module's docstring for the rule."""
    query_indices = np.asarray(query_indices, dtype=np.int64)
    if len(query_indices) and (data.label[query_indices] != 1).any():
        raise ValueError("query_indices must be positive samples (label 1)")
    splits = len(SPLIT_NAMES)
    positives = data.label == 1
    # end(u, s): every interaction is a positive sample, and a device's sequence runs through train, valid, test
    per_split = np.bincount(
        data.sample_row[positives] * splits + data.split[positives], minlength=data.num_devices * splits
    )
    end = np.cumsum(per_split.reshape(data.num_devices, splits), axis=1).reshape(-1)
    device_row = data.rows_of(data.sample_device[query_indices])
    keys, row = np.unique(device_row * splits + data.split[query_indices], return_inverse=True)
    lengths = end[keys]
    items = data.seq_items[index_ranges(data.seq_offsets[keys // splits], lengths)]
    return Exclusions(
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        items=items.astype(np.int64),
        row=row.astype(np.int64).reshape(-1),
        positive=data.item[query_indices].astype(np.int64),
    )
