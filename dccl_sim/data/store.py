"""A dataset directory: Arrow schemas and Parquet files partitioned by device shard.

```
meta.json                              DatasetMeta
items.parquet                          item, raw_item_id, category
devices.parquet                        device_id, raw_user_id, shard, n_interactions, n_train, profile_*
sequences/shard=NNNNN/part-0.parquet   device_id, seq_pos, item, timestamp
samples/shard=NNNNN/part-0.parquet     device_id, item_id, label, timestamp, seq_pos, split
```
Devices are sharded by contiguous id ranges (`device_id // shard_size`), so an actor holding a range of
devices reads only its own shards. Paths may be local or any pyarrow filesystem URI.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dccl_sim.data.build import FORMAT_VERSION, BuiltDataset, DatasetMeta, with_eval_negatives
from dccl_sim.data.device_data import SPLIT_TRAIN, DeviceData
from dccl_sim.data.raw import DataError
from dccl_sim.progress import Progress

SAMPLE_SCHEMA = pa.schema(
    [
        ("device_id", pa.int64()),
        ("item_id", pa.int32()),
        ("label", pa.int8()),
        ("timestamp", pa.int64()),
        ("seq_pos", pa.int32()),
        ("split", pa.int8()),
    ]
)
SEQUENCE_SCHEMA = pa.schema(
    [("device_id", pa.int64()), ("seq_pos", pa.int32()), ("item", pa.int32()), ("timestamp", pa.int64())]
)


def _filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(root) if "://" in root else (pafs.LocalFileSystem(), root)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"cannot open dataset location {root!r}: {error}") from None


def _shard_path(root: str, kind: str, shard: int) -> str:
    return f"{root}/{kind}/shard={shard:05d}/part-0.parquet"


def write_dataset(built: BuiltDataset, root: str, on_progress: Progress | None = None) -> None:
    """Write a built dataset under `root` (created; existing files are replaced); `on_progress` hears of every
    shard written."""
    fs, path = _filesystem(str(root))
    try:
        _write_dataset(built, fs, path, on_progress)
    except OSError as error:  # e.g. a bucket that does not exist, no write permission, an endpoint nobody answers
        raise DataError(f"cannot write the dataset to {root}: {error}") from None


def _write_dataset(built: BuiltDataset, fs: pafs.FileSystem, root: str, on_progress: Progress | None) -> None:
    meta, data = built.meta, built.data
    fs.create_dir(root, recursive=True)

    items = pa.table(
        {
            "item": pa.array(np.arange(1, meta.num_items + 1), pa.int32()),
            "raw_item_id": pa.array(built.raw_item_ids),
            "category": pa.array(built.item_category[1:], pa.int32()),
        }
    )
    pq.write_table(items, f"{root}/items.parquet", filesystem=fs)

    n_interactions = np.diff(data.seq_offsets)
    device_columns = {
        "device_id": pa.array(data.device_ids),
        "raw_user_id": pa.array(built.raw_user_ids),
        "shard": pa.array(data.device_ids // meta.shard_size, pa.int32()),
        "n_interactions": pa.array(n_interactions, pa.int32()),
        "n_train": pa.array(data.n_train, pa.int32()),
    }
    for column, name in enumerate(meta.profile_fields):
        device_columns[f"profile_{name}"] = pa.array(data.profile[:, column], pa.int32())
    pq.write_table(pa.table(device_columns), f"{root}/devices.parquet", filesystem=fs)

    seq_device = np.repeat(data.device_ids, n_interactions)
    seq_pos = np.arange(len(seq_device)) - np.repeat(data.seq_offsets[:-1], n_interactions)
    seq_time = np.zeros(len(seq_device), dtype=np.int64)
    positives = data.label == 1
    seq_time[data.seq_offsets[data.rows_of(data.sample_device[positives])] + data.seq_pos[positives]] = data.timestamp[
        positives
    ]
    sequences = pa.table(
        [pa.array(seq_device), pa.array(seq_pos, pa.int32()), pa.array(data.seq_items), pa.array(seq_time)],
        schema=SEQUENCE_SCHEMA,
    )
    samples = pa.table(
        [
            pa.array(data.sample_device),
            pa.array(data.item),
            pa.array(data.label),
            pa.array(data.timestamp),
            pa.array(data.seq_pos),
            pa.array(data.split),
        ],
        schema=SAMPLE_SCHEMA,
    )
    seq_bounds = np.searchsorted(seq_device, np.arange(meta.num_shards + 1) * meta.shard_size)
    sample_bounds = np.searchsorted(data.sample_device, np.arange(meta.num_shards + 1) * meta.shard_size)
    for shard in range(meta.num_shards):
        for kind, table, bounds in (("sequences", sequences, seq_bounds), ("samples", samples, sample_bounds)):
            fs.create_dir(f"{root}/{kind}/shard={shard:05d}", recursive=True)
            part = table.slice(bounds[shard], bounds[shard + 1] - bounds[shard])
            pq.write_table(part, _shard_path(root, kind, shard), filesystem=fs)
        if on_progress is not None:
            on_progress("writing the dataset: shard", shard + 1, meta.num_shards)

    # meta.json last: its presence marks a complete dataset
    with fs.open_output_stream(f"{root}/meta.json") as stream:
        stream.write(meta.model_dump_json(indent=2).encode())


def read_meta(root: str) -> DatasetMeta:
    fs, path = _filesystem(str(root))
    try:
        with fs.open_input_stream(f"{path}/meta.json") as stream:
            values = json.loads(stream.read())
    except FileNotFoundError:
        raise DataError(f"{root} is not a dataset directory (no meta.json); create one with `dccl-sim data`") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{root}/meta.json is corrupt: {error}") from None
    except OSError as error:  # e.g. an object store's endpoint nobody answers, access denied
        raise DataError(f"cannot read {root}/meta.json: {error}") from None
    if values.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{root}: dataset format {values.get('format_version')} but this dccl-sim reads {FORMAT_VERSION}"
        )
    return DatasetMeta.model_validate(values)


def read_item_category(root: str) -> np.ndarray:
    """Category of every item index, with index 0 (padding) first."""
    fs, path = _filesystem(str(root))
    items = _read(fs, f"{path}/items.parquet", None)
    order = np.argsort(items["item"].to_numpy())
    return np.concatenate([[0], items["category"].to_numpy()[order].astype(np.int64)])


def _read(fs: pafs.FileSystem, path: str, device_ids: np.ndarray | None, schema: pa.Schema | None = None) -> pa.Table:
    try:
        table = pq.read_table(path, filesystem=fs, schema=schema)
    except FileNotFoundError:
        raise DataError(f"dataset file missing: {path}") from None
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"dataset file {path} is corrupt or unreadable: {error}") from None
    if device_ids is not None:
        table = table.filter(pc.is_in(table["device_id"], value_set=pa.array(device_ids)))
    return table


def _without_eval_samples(samples: pa.Table, keep_for: np.ndarray | None) -> pa.Table:
    if keep_for is None:
        return samples
    evaluated = pc.is_in(samples["device_id"], value_set=pa.array(keep_for, type=pa.int64()))
    return samples.filter(pc.or_(pc.equal(samples["split"], SPLIT_TRAIN), evaluated))


def read_devices(
    root: str, device_ids: np.ndarray | None = None, eval_samples_of: np.ndarray | None = None
) -> DeviceData:
    """Load the given devices (all when None), reading only the shards that hold them. With `eval_samples_of`,
    validation and test samples are kept only for those devices, dropped shard by shard as they are read (with 99
    negatives per positive they are most of a dataset). A dataset built with `eval_negatives_on_load` draws the
    kept evaluation positives' negatives here (`with_eval_negatives`)."""
    meta = read_meta(root)
    fs, path = _filesystem(str(root))
    if device_ids is None:
        device_ids = np.arange(meta.num_devices, dtype=np.int64)
    device_ids = np.unique(np.asarray(device_ids, dtype=np.int64))
    if len(device_ids) == 0 or device_ids[0] < 0 or device_ids[-1] >= meta.num_devices:
        raise DataError(f"{root}: device ids must lie in 0..{meta.num_devices - 1}")
    shards = np.unique(device_ids // meta.shard_size)
    whole = len(device_ids) == meta.num_devices
    selection = None if whole else device_ids

    devices = _read(fs, f"{path}/devices.parquet", selection).sort_by("device_id")
    sequences = pa.concat_tables(
        [_read(fs, _shard_path(path, "sequences", s), selection, SEQUENCE_SCHEMA) for s in shards]
    )
    samples = pa.concat_tables(
        [
            _without_eval_samples(_read(fs, _shard_path(path, "samples", s), selection, SAMPLE_SCHEMA), eval_samples_of)
            for s in shards
        ]
    )
    if not np.array_equal(devices["device_id"].to_numpy(), device_ids):
        raise DataError(f"{root}/devices.parquet does not list every requested device")

    n_interactions = devices["n_interactions"].to_numpy().astype(np.int64)
    seq_items = sequences["item"].to_numpy()
    if len(seq_items) != n_interactions.sum():
        raise DataError(f"{root}: sequences do not match devices.parquet (corrupt dataset)")
    profile = (
        np.stack([devices[f"profile_{name}"].to_numpy().astype(np.int64) for name in meta.profile_fields], axis=1)
        if meta.profile_fields
        else np.zeros((len(device_ids), 0), dtype=np.int64)
    )
    item = samples["item_id"].to_numpy()
    if len(item) and (item.min() < 1 or item.max() > meta.num_items):
        raise DataError(f"{root}: samples name item ids outside 1..{meta.num_items} (unknown items)")
    data = DeviceData(
        device_ids=device_ids,
        seq_offsets=np.concatenate([[0], np.cumsum(n_interactions)]).astype(np.int64),
        seq_items=seq_items,
        n_train=devices["n_train"].to_numpy().astype(np.int32),
        profile=profile,
        sample_device=samples["device_id"].to_numpy(),
        item=item,
        label=samples["label"].to_numpy(),
        seq_pos=samples["seq_pos"].to_numpy(),
        split=samples["split"].to_numpy(),
        timestamp=samples["timestamp"].to_numpy(),
    )
    if meta.eval_negatives_on_load:
        data = with_eval_negatives(data, meta.eval_negatives, meta.num_items, meta.seed)
    return data


def samples_per_device(root: str, evaluated: np.ndarray | None = None) -> np.ndarray:
    """How many samples each device holds once loaded (all splits, negatives included), from devices.parquet alone:
    each training positive with `train_negatives` negatives, each validation or test positive with
    `eval_negatives`; with `evaluated` (sorted ids), the others' evaluation samples count as dropped on load."""
    meta = read_meta(root)
    fs, path = _filesystem(str(root))
    devices = _read(fs, f"{path}/devices.parquet", None).sort_by("device_id")
    n_train = devices["n_train"].to_numpy().astype(np.int64)
    n_eval = devices["n_interactions"].to_numpy().astype(np.int64) - n_train
    if evaluated is not None:
        n_eval[~np.isin(np.arange(len(n_eval)), evaluated)] = 0
    return n_train * (1 + meta.train_negatives) + n_eval * (1 + meta.eval_negatives)


def new_temp_path(root: str) -> str:
    """A sibling of `root` to build into before an atomic rename."""
    return f"{root}.tmp-{uuid.uuid4().hex[:8]}"
