"""Parquet storage partitioned by device shard, and reading only some devices back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dccl_sim.config import DataConfig
from dccl_sim.data.build import BuiltDataset, build_dataset
from dccl_sim.data.device_data import SPLIT_TRAIN
from dccl_sim.data.prepare import prepare_dataset, write_to
from dccl_sim.data.raw import DataError
from dccl_sim.data.store import SAMPLE_SCHEMA, read_devices, read_item_category, read_meta, samples_per_device


@pytest.fixture
def sharded(ml100k_raw, tmp_path: Path) -> tuple[BuiltDataset, Path]:
    built = build_dataset(ml100k_raw, DataConfig(num_devices=50, eval_negatives=5, shard_size=16), seed=0)
    write_to(built, tmp_path / "ds")
    return built, tmp_path / "ds"


def _assert_same(a, b) -> None:
    for field in dataclasses.fields(a):
        assert np.array_equal(getattr(a, field.name), getattr(b, field.name)), field.name


def test_round_trip_of_the_whole_dataset(sharded) -> None:
    built, root = sharded
    assert read_meta(str(root)) == built.meta
    assert built.meta.num_shards == 4
    assert np.array_equal(read_item_category(str(root)), built.item_category)
    _assert_same(read_devices(str(root)), built.data)


def test_samples_files_follow_the_arrow_schema_and_shards(sharded) -> None:
    _, root = sharded
    shards = sorted(p.name for p in (root / "samples").iterdir())
    assert shards == ["shard=00000", "shard=00001", "shard=00002", "shard=00003"]
    table = pq.read_table(root / "samples" / "shard=00002" / "part-0.parquet")
    assert table.schema.equals(SAMPLE_SCHEMA)
    ids = table["device_id"].to_numpy()
    assert ids.min() == 32 and ids.max() == 47


def test_reading_some_devices_equals_the_subset_and_touches_only_their_shards(sharded) -> None:
    built, root = sharded
    wanted = np.array([17, 3, 40])
    # remove a shard none of them lives in: reading must not need it
    for kind in ("samples", "sequences"):
        (root / kind / "shard=00003" / "part-0.parquet").unlink()
    _assert_same(read_devices(str(root), wanted), built.data.subset(np.sort(wanted)))
    with pytest.raises(DataError, match="dataset file missing"):
        read_devices(str(root), np.array([49]))


def test_corrupt_and_missing_files_give_clear_errors(sharded, tmp_path: Path) -> None:
    _, root = sharded
    (root / "samples" / "shard=00001" / "part-0.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="corrupt or unreadable"):
        read_devices(str(root), np.array([20]))
    with pytest.raises(DataError, match="not a dataset directory"):
        read_meta(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"device ids must lie in 0\.\.49"):
        read_devices(str(root), np.array([50]))


def test_prepare_dataset_caches_by_settings(ml100k_raw, tmp_path: Path) -> None:
    config = DataConfig(num_devices=20, eval_negatives=3, cache_dir=tmp_path)
    first = prepare_dataset(config, seed=0)
    assert read_meta(first).num_devices == 20
    stamp = (Path(first) / "meta.json").stat().st_mtime_ns
    assert prepare_dataset(config, seed=0) == first
    assert (Path(first) / "meta.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert prepare_dataset(config.model_copy(update={"eval_negatives": 4}), seed=0) != first
    assert prepare_dataset(config, seed=1) != first
    # a dataset directory given as the source is used as it is
    assert prepare_dataset(config.model_copy(update={"source": first}), seed=5) == first


def test_eval_samples_of_keeps_training_samples_and_only_the_chosen_devices_eval_samples(sharded) -> None:
    _, root = sharded
    full = read_devices(str(root))
    chosen = np.array([2, 7])
    kept = read_devices(str(root), eval_samples_of=chosen)
    train = full.split == SPLIT_TRAIN
    assert np.array_equal(kept.item[kept.split == SPLIT_TRAIN], full.item[train])
    assert set(np.unique(kept.sample_device[kept.split != SPLIT_TRAIN]).tolist()) == {2, 7}
    assert (kept.split != SPLIT_TRAIN).sum() < (~train).sum()
    for device in chosen:
        assert np.array_equal(kept.item[kept.sample_device == device], full.item[full.sample_device == device])


def test_samples_per_device_counts_what_a_host_loads(sharded, ml100k_raw, tmp_path: Path) -> None:
    """The packs are balanced on these counts, read from devices.parquet alone: they must be the samples a host
    holds once it has loaded its devices, with evaluation negatives stored or drawn on load, and with only some
    devices' evaluation samples kept."""
    lazy = build_dataset(
        ml100k_raw, DataConfig(num_devices=50, eval_negatives=5, shard_size=16, eval_negatives_on_load=True), seed=0
    )
    write_to(lazy, tmp_path / "lazy")
    evaluated = np.array([2, 7, 31])
    for root in (str(sharded[1]), str(tmp_path / "lazy")):
        for chosen in (None, evaluated):
            loaded = read_devices(root, eval_samples_of=chosen)
            held = np.bincount(loaded.sample_device, minlength=50)
            assert np.array_equal(samples_per_device(root, chosen), held), (root, chosen)
    assert not np.array_equal(samples_per_device(root), samples_per_device(root, evaluated))


def test_eval_negatives_drawn_on_load_match_the_stored_layout_for_any_subset(ml100k_raw, tmp_path: Path) -> None:
    config = DataConfig(num_devices=50, eval_negatives=5, shard_size=16)
    stored = build_dataset(ml100k_raw, config, seed=0)
    lazy = build_dataset(ml100k_raw, config.model_copy(update={"eval_negatives_on_load": True}), seed=0)
    write_to(lazy, tmp_path / "lazy")
    root = str(tmp_path / "lazy")
    assert (lazy.data.label[lazy.data.split != SPLIT_TRAIN] == 1).all()  # no evaluation negatives are written
    loaded = read_devices(root)
    # the same rows as a dataset with stored negatives, except the negative items themselves
    for name in ("sample_device", "seq_pos", "split", "label", "timestamp"):
        assert np.array_equal(getattr(loaded, name), getattr(stored.data, name)), name
    positive = loaded.label == 1
    assert np.array_equal(loaded.item[positive], stored.data.item[positive])
    train = loaded.split == SPLIT_TRAIN
    negative = ~train & ~positive
    assert not np.array_equal(loaded.item[negative], stored.data.item[negative])
    seq_device = np.repeat(loaded.device_ids, np.diff(loaded.seq_offsets))
    touched = set(zip(seq_device.tolist(), loaded.seq_items.tolist(), strict=True))
    pairs = zip(loaded.sample_device[negative].tolist(), loaded.item[negative].tolist(), strict=True)
    assert not any(pair in touched for pair in pairs)
    assert len(np.unique(loaded.item[negative])) > 50  # spread over the catalogue, not a few items
    # a process loading only some devices draws the same negatives for them, with or without other devices' eval rows
    some = np.array([3, 17, 40])
    assert np.array_equal(read_devices(root, some).item, loaded.item[np.isin(loaded.sample_device, some)])
    mine = np.isin(loaded.sample_device, some) & (train | np.isin(loaded.sample_device, some[:2]))
    assert np.array_equal(read_devices(root, some, eval_samples_of=some[:2]).item, loaded.item[mine])
    # another seed draws other negatives
    other = build_dataset(ml100k_raw, config.model_copy(update={"eval_negatives_on_load": True}), seed=1)
    write_to(other, tmp_path / "other")
    assert not np.array_equal(read_devices(str(tmp_path / "other")).item, loaded.item)


def test_a_cached_dataset_another_process_completed_is_kept(tmp_path: Path, ml100k_small) -> None:
    """Two runs building the same cache entry at once: the later rename keeps the complete dataset the earlier one
    put there (a run may be reading it) instead of removing it; a plain write replaces it."""
    root = tmp_path / "entry"
    write_to(ml100k_small, root, cached=True)
    marker = root / "samples" / "reader-was-here"
    marker.write_text("")
    write_to(ml100k_small, root, cached=True)
    assert marker.exists() and (root / "meta.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p != root]  # the second build's temporary folder is gone
    write_to(ml100k_small, root)
    assert not marker.exists() and (root / "meta.json").is_file()
