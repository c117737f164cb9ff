"""Sample construction: device ids, time order, per-user splits, negatives, histories and round windows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dccl_sim.config import DataConfig
from dccl_sim.data.build import build_dataset, split_sizes
from dccl_sim.data.device_data import PRETRAIN_WINDOW, SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID, DeviceData
from dccl_sim.data.raw import DataError, RawDataset


def test_split_sizes_keep_one_test_and_one_train_interaction() -> None:
    train, valid, test = split_sizes(np.array([3, 10, 100]), test_frac=0.2, valid_frac=0.1)
    assert test.tolist() == [1, 2, 20]
    assert valid.tolist() == [0, 1, 10]
    assert train.tolist() == [2, 7, 70]
    train, valid, test = split_sizes(np.array([3]), test_frac=0.3, valid_frac=0.5)
    assert (train[0], valid[0], test[0]) == (1, 1, 1)


def test_devices_are_users_in_raw_id_order_with_time_sorted_sequences(tiny_raw: RawDataset) -> None:
    built = build_dataset(tiny_raw, DataConfig(train_negatives=1, eval_negatives=3), seed=0)
    data = built.data
    assert built.raw_user_ids.tolist() == [10, 20, 30]
    assert np.diff(data.seq_offsets).tolist() == [12, 8, 5]
    # user 10's sequence, mapped to item indices 1..16 (raw id 100 -> 1)
    expected = [(p * 7 + 10) % 16 + 1 for p in range(12)]
    assert data.seq_items[:12].tolist() == expected
    assert built.item_category.tolist() == [0] + [i % 3 for i in range(16)]
    assert data.profile[:, 0].tolist() == [0, 1, 1]


def test_splits_follow_time_and_negatives_avoid_touched_items(tiny_raw: RawDataset) -> None:
    built = build_dataset(tiny_raw, DataConfig(train_negatives=2, eval_negatives=4), seed=3)
    data = built.data
    positives = data.label == 1
    for row, device in enumerate(data.device_ids):
        mine = data.sample_device == device
        pos_splits = data.split[mine & positives]
        # time order: all training positions come before validation, which come before test
        assert np.all(np.diff(pos_splits) >= 0)
        touched = set(data.seq_items[data.seq_offsets[row] : data.seq_offsets[row + 1]].tolist())
        negatives = data.item[mine & ~positives]
        assert touched.isdisjoint(negatives.tolist())
    per_positive = np.bincount(data.split[~positives], minlength=3) / np.bincount(data.split[positives], minlength=3)
    assert per_positive[SPLIT_TRAIN] == 2 and per_positive[SPLIT_TEST] == 4
    # every query is one positive followed by its negatives, sharing position and timestamp
    queries = data.query_ids()
    first = np.r_[True, queries[1:] != queries[:-1]]
    assert np.array_equal(first, positives)


def test_build_is_deterministic_for_a_seed(tiny_raw: RawDataset) -> None:
    a = build_dataset(tiny_raw, DataConfig(), seed=1).data
    b = build_dataset(tiny_raw, DataConfig(), seed=1).data
    c = build_dataset(tiny_raw, DataConfig(), seed=2).data
    assert np.array_equal(a.item, b.item)
    assert not np.array_equal(a.item, c.item)


def test_history_is_the_last_items_before_each_sample(tiny_raw: RawDataset) -> None:
    data = build_dataset(tiny_raw, DataConfig(train_negatives=0, eval_negatives=1), seed=0).data
    sequence = data.seq_items[:12]
    indices = np.flatnonzero((data.sample_device == 0) & (data.label == 1))
    batch = data.batch(indices, history_len=4)
    for row, position in enumerate(data.seq_pos[indices]):
        expected = sequence[max(0, position - 4) : position].tolist()
        expected = [0] * (4 - len(expected)) + expected  # left padding, most recent last
        assert batch.history[row].tolist() == expected
    assert batch.history[0].tolist() == [0, 0, 0, 0]  # the first interaction has no history


def test_history_longer_than_any_sequence_is_padded(tiny_raw: RawDataset) -> None:
    data = build_dataset(tiny_raw, DataConfig(), seed=0).data
    batch = data.batch(np.arange(data.num_samples), history_len=50)
    assert batch.history.shape == (data.num_samples, 50)
    assert int((batch.history > 0).sum(dim=1).max()) == 11  # user 10's last item sees its 11 predecessors


def test_windows_cut_training_positions_into_rounds(ml100k_small) -> None:
    data = ml100k_small.data
    windows = data.windows(rounds=4, pretrain_frac=0.5)
    train = data.split == SPLIT_TRAIN
    assert set(np.unique(windows[train]).tolist()) == {PRETRAIN_WINDOW, 0, 1, 2, 3}
    assert np.all(windows[~train] == 4)
    # within a device, windows never go back in time
    for device in data.device_ids[:10]:
        mine = train & (data.sample_device == device) & (data.label == 1)
        assert np.all(np.diff(windows[mine]) >= 0)
        n_train = int(data.n_train[device])
        assert int((windows[mine] == PRETRAIN_WINDOW).sum()) == n_train // 2


def test_users_below_min_interactions_are_dropped_and_num_devices_keeps_the_first(tiny_raw: RawDataset) -> None:
    built = build_dataset(tiny_raw, DataConfig(min_interactions=6), seed=0)
    assert built.raw_user_ids.tolist() == [10, 20]
    assert built.meta.dropped_users == 1
    built = build_dataset(tiny_raw, DataConfig(num_devices=1), seed=0)
    assert built.raw_user_ids.tolist() == [10]
    with pytest.raises(DataError, match="no user has at least 50"):
        build_dataset(tiny_raw, DataConfig(min_interactions=50), seed=0)


def test_interactions_with_unknown_items_are_rejected(tiny_raw: RawDataset) -> None:
    broken = dataclasses.replace(tiny_raw, item_id=tiny_raw.item_id.copy())
    broken.item_id[0] = 999
    with pytest.raises(DataError, match="missing from the item table"):
        build_dataset(broken, DataConfig(), seed=0)


def test_a_user_who_touched_every_item_cannot_get_negatives(tiny_raw: RawDataset) -> None:
    everything = dataclasses.replace(
        tiny_raw,
        user_id=np.full(16, 10),
        item_id=np.arange(100, 116),
        timestamp=np.arange(16),
    )
    with pytest.raises(DataError, match="every item"):
        build_dataset(everything, DataConfig(), seed=0)


def test_ml100k_build_covers_every_user_with_valid_and_test(ml100k_small) -> None:
    data = ml100k_small.data
    assert ml100k_small.meta.num_items == 1682
    for split in (SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST):
        assert np.array_equal(np.unique(data.sample_device[data.split == split]), data.device_ids)


def test_sample_rows_hold_for_sorted_and_unsorted_samples() -> None:
    def data_with(sample_device: np.ndarray) -> DeviceData:
        n = len(sample_device)
        return DeviceData(
            device_ids=np.array([3, 5, 9]),
            seq_offsets=np.array([0, 1, 2, 3]),
            seq_items=np.array([1, 2, 3], dtype=np.int32),
            n_train=np.array([1, 1, 1], dtype=np.int32),
            profile=np.zeros((3, 0), dtype=np.int64),
            sample_device=sample_device,
            item=np.ones(n, dtype=np.int32),
            label=np.zeros(n, dtype=np.int8),
            seq_pos=np.zeros(n, dtype=np.int32),
            split=np.zeros(n, dtype=np.int8),
            timestamp=np.zeros(n, dtype=np.int64),
        )

    np.testing.assert_array_equal(data_with(np.array([3, 3, 9, 9, 9])).sample_row, [0, 0, 2, 2, 2])
    np.testing.assert_array_equal(data_with(np.array([9, 3, 5, 3])).sample_row, [2, 0, 1, 0])
    with pytest.raises(KeyError):
        _ = data_with(np.array([3, 4])).sample_row
