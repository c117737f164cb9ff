"""From raw interactions to samples: device ids, time-ordered sequences, splits and sampled negatives."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np
from pydantic import BaseModel, ConfigDict

from dccl_sim.config import DataConfig
from dccl_sim.data.device_data import QUERY_POS_BITS, SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID, DeviceData
from dccl_sim.data.raw import DataError, RawDataset
from dccl_sim.progress import Progress
from dccl_sim.sizing import eval_negatives_on_load

FORMAT_VERSION = 1
_NEGATIVES_CHUNK = 1 << 22  # draws checked between progress reports (~0.5 s)


class DatasetMeta(BaseModel):
    """What a dataset directory holds (its `meta.json`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = FORMAT_VERSION
    source: str
    seed: int
    num_devices: int
    num_items: int
    num_categories: int
    profile_fields: list[str]
    profile_cardinalities: list[int]
    history_len: int
    train_negatives: int
    eval_negatives: int
    eval_negatives_on_load: bool = False
    test_frac: float
    valid_frac: float
    min_interactions: int
    shard_size: int
    num_shards: int
    dropped_users: int


@dataclass(frozen=True)
class BuiltDataset:
    meta: DatasetMeta
    item_category: np.ndarray  # [num_items + 1] int64; index 0 is the padding item
    raw_item_ids: np.ndarray  # [num_items] raw id of item index 1..num_items
    raw_user_ids: np.ndarray  # [num_devices] raw id of each device
    data: DeviceData


def split_sizes(n: np.ndarray, test_frac: float, valid_frac: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-user (train, valid, test) counts: at least one test and one training interaction."""
    n_test = np.maximum(1, np.round(test_frac * n)).astype(np.int64)
    n_valid = np.round(valid_frac * n).astype(np.int64)
    n_valid = np.clip(n_valid, 0, n - n_test - 1)
    return n - n_test - n_valid, n_valid, n_test


def sample_negatives(
    rng: np.random.Generator,
    owner: np.ndarray,
    count: np.ndarray,
    touched_keys: np.ndarray,
    num_items: int,
    on_progress: Progress | None = None,
) -> np.ndarray:
    """For each query q draw `count[q]` items in 1..num_items that device `owner[q]` never touched.

    `touched_keys` are the sorted unique keys device * (num_items + 1) + item of all interactions.
    Vectorized rejection sampling; every device must leave at least one item untouched. The first check of every
    draw, most of the work, goes chunk by chunk so that `on_progress` hears how far it is (the draws are the same).
    """
    owners = np.repeat(owner.astype(np.int64), count)
    items = rng.integers(1, num_items + 1, size=len(owners))
    stride = num_items + 1

    def taken(at: np.ndarray) -> np.ndarray:
        keys = owners[at] * stride + items[at]
        found = np.minimum(np.searchsorted(touched_keys, keys), len(touched_keys) - 1)
        return at[touched_keys[found] == keys]

    bounds = [*range(0, len(owners), _NEGATIVES_CHUNK), len(owners)]
    parts = []
    for lo, hi in itertools.pairwise(bounds):
        parts.append(taken(np.arange(lo, hi)))
        if on_progress is not None:
            on_progress("building samples: negative", hi, len(owners))
    pending = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    for _ in range(999):
        if len(pending) == 0:
            break
        items[pending] = rng.integers(1, num_items + 1, size=len(pending))
        pending = taken(pending)
    if len(pending):
        raise DataError("could not sample negatives: some user has interacted with nearly every item")
    return items


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijective scramble of uint64 values (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def counter_negatives(
    seed: int, owner: np.ndarray, position: np.ndarray, count: int, touched_keys: np.ndarray, num_items: int
) -> np.ndarray:
    """[Q, count] items in 1..num_items that device `owner[q]` never touched, each drawn from a hash of (seed,
    owner, position, j, attempt) alone: whichever process draws them, and for whichever subset of devices, the
    negatives of a query are the same. `touched_keys` as in `sample_negatives`."""
    with np.errstate(over="ignore"):
        query = _mix64(np.uint64(seed & (2**64 - 1)) ^ _mix64(owner.astype(np.uint64) << np.uint64(QUERY_POS_BITS)))
        query = _mix64(query ^ position.astype(np.uint64))
        keys = (query[:, None] ^ (np.arange(count, dtype=np.uint64)[None, :] << np.uint64(40))).ravel()
        owners = np.repeat(owner.astype(np.int64), count)
        items = np.empty(len(keys), dtype=np.int64)
        pending = np.arange(len(keys))
        stride = num_items + 1
        for attempt in range(1000):
            drawn = _mix64(keys[pending] ^ np.uint64(attempt)) % np.uint64(num_items)
            items[pending] = drawn.astype(np.int64) + 1
            wanted = owners[pending] * stride + items[pending]
            at = np.minimum(np.searchsorted(touched_keys, wanted), len(touched_keys) - 1)
            pending = pending[touched_keys[at] == wanted]
            if len(pending) == 0:
                return items.reshape(len(owner), count)
    raise DataError("could not draw evaluation negatives: some user has interacted with nearly every item")


def with_eval_negatives(data: DeviceData, count: int, num_items: int, seed: int) -> DeviceData:
    """`data` whose validation and test positives are each followed by `count` negatives drawn by
    `counter_negatives`: the layout a dataset with stored evaluation negatives has."""
    query = np.flatnonzero((data.split != SPLIT_TRAIN) & (data.label == 1))
    if len(query) == 0:
        return data
    seq_device = np.repeat(data.device_ids, np.diff(data.seq_offsets))
    touched = np.unique(seq_device * (num_items + 1) + data.seq_items)
    owner = data.sample_device[query].astype(np.int64)
    negatives = counter_negatives(seed, owner, data.seq_pos[query], count, touched, num_items)
    copies = np.ones(len(data.label), dtype=np.int64)
    copies[query] += count
    source = np.repeat(np.arange(len(copies)), copies)
    first = np.concatenate([[0], np.cumsum(copies)[:-1]])
    negative_slot = (first[query][:, None] + np.arange(1, count + 1)[None, :]).ravel()
    item = data.item[source]
    item[negative_slot] = negatives.ravel()
    label = data.label[source]
    label[negative_slot] = 0
    return replace(
        data,
        sample_device=data.sample_device[source],
        item=item,
        label=label,
        seq_pos=data.seq_pos[source],
        split=data.split[source],
        timestamp=data.timestamp[source],
    )


def build_dataset(raw: RawDataset, config: DataConfig, seed: int, on_progress: Progress | None = None) -> BuiltDataset:
    """Build the samples of docs/design.md §2 and §4 from a raw dataset, seeded; `on_progress` hears of the
    negatives drawn (most of the time it takes)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xDA7A]))

    item_ids = np.unique(raw.item_ids)
    if len(item_ids) != len(raw.item_ids):
        raise DataError(f"{raw.name}: duplicate item ids in the item table")
    order = np.argsort(raw.item_ids, kind="stable")
    category_sorted = raw.item_category[order].astype(np.int64)
    item_index = np.searchsorted(item_ids, raw.item_id)
    unknown = (item_index >= len(item_ids)) | (item_ids[np.minimum(item_index, len(item_ids) - 1)] != raw.item_id)
    if unknown.any():
        raise DataError(f"{raw.name}: {int(unknown.sum())} interactions name items missing from the item table")
    item_index = item_index.astype(np.int64) + 1
    num_items = len(item_ids)

    users, user_of, counts = np.unique(raw.user_id, return_inverse=True, return_counts=True)
    keep_user = counts >= config.min_interactions
    kept = np.flatnonzero(keep_user)
    if config.num_devices is not None:
        kept = kept[: config.num_devices]
    if len(kept) == 0:
        raise DataError(f"{raw.name}: no user has at least {config.min_interactions} interactions")
    device_of_user = np.full(len(users), -1, dtype=np.int64)
    device_of_user[kept] = np.arange(len(kept))
    device = device_of_user[user_of]
    mask = device >= 0
    device, item, timestamp = device[mask], item_index[mask], raw.timestamp[mask].astype(np.int64)
    raw_user_ids = users[kept]

    profile_fields = sorted(raw.profiles)
    profile = np.zeros((len(kept), len(profile_fields)), dtype=np.int64)
    if profile_fields:
        profile_user_order = np.argsort(raw.user_ids, kind="stable")
        sorted_profile_users = raw.user_ids[profile_user_order]
        at = np.minimum(np.searchsorted(sorted_profile_users, raw_user_ids), len(sorted_profile_users) - 1)
        missing = sorted_profile_users[at] != raw_user_ids
        if missing.any():
            raise DataError(f"{raw.name}: user {raw_user_ids[missing][0]} has interactions but no profile")
        for column, name in enumerate(profile_fields):
            profile[:, column] = raw.profiles[name][profile_user_order[at]]

    # time order within each device; the original order breaks timestamp ties deterministically
    order = np.lexsort((np.arange(len(device)), timestamp, device))
    device, item, timestamp = device[order], item[order], timestamp[order]
    n = np.bincount(device, minlength=len(kept)).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(n)])
    seq_pos = np.arange(len(device), dtype=np.int64) - offsets[device]
    if seq_pos.max() >= 2**QUERY_POS_BITS:
        raise DataError(f"{raw.name}: a user has more than {2**QUERY_POS_BITS} interactions")
    n_train, n_valid, _ = split_sizes(n, config.test_frac, config.valid_frac)
    split = np.full(len(device), SPLIT_TEST, dtype=np.int8)
    split[seq_pos < n_train[device]] = SPLIT_TRAIN
    split[(seq_pos >= n_train[device]) & (seq_pos < (n_train + n_valid)[device])] = SPLIT_VALID

    touched = np.unique(device * (num_items + 1) + item)
    if np.any(np.bincount(touched // (num_items + 1), minlength=len(kept)) >= num_items):
        raise DataError(f"{raw.name}: a user has interacted with every item; no negatives can be sampled")
    on_load = eval_negatives_on_load(config)
    stored_eval_negatives = 0 if on_load else config.eval_negatives
    negatives_per = np.where(split == SPLIT_TRAIN, config.train_negatives, stored_eval_negatives)
    negative_items = sample_negatives(rng, device, negatives_per, touched, num_items, on_progress)
    source_of_negative = np.repeat(np.arange(len(device)), negatives_per)

    # interleave: each positive followed by its negatives, all sorted by (device, position)
    positive_slot = np.arange(len(device)) + np.concatenate([[0], np.cumsum(negatives_per)[:-1]])
    total = len(device) + len(negative_items)
    is_positive = np.zeros(total, dtype=bool)
    is_positive[positive_slot] = True
    source = np.empty(total, dtype=np.int64)
    source[positive_slot] = np.arange(len(device))
    source[~is_positive] = source_of_negative
    sample_item = np.empty(total, dtype=np.int64)
    sample_item[positive_slot] = item
    sample_item[~is_positive] = negative_items

    data = DeviceData(
        device_ids=np.arange(len(kept), dtype=np.int64),
        seq_offsets=offsets.astype(np.int64),
        seq_items=item.astype(np.int32),
        n_train=n_train.astype(np.int32),
        profile=profile,
        sample_device=device[source],
        item=sample_item.astype(np.int32),
        label=is_positive.astype(np.int8),
        seq_pos=seq_pos[source].astype(np.int32),
        split=split[source],
        timestamp=timestamp[source],
    )
    num_shards = -(-len(kept) // config.shard_size)
    meta = DatasetMeta(
        source=raw.name,
        seed=seed,
        num_devices=len(kept),
        num_items=num_items,
        num_categories=raw.num_categories,
        profile_fields=profile_fields,
        profile_cardinalities=[raw.profile_cardinalities[name] for name in profile_fields],
        history_len=config.history_len,
        train_negatives=config.train_negatives,
        eval_negatives=config.eval_negatives,
        eval_negatives_on_load=on_load,
        test_frac=config.test_frac,
        valid_frac=config.valid_frac,
        min_interactions=config.min_interactions,
        shard_size=config.shard_size,
        num_shards=num_shards,
        dropped_users=int(len(users) - len(kept)),
    )
    item_category = np.concatenate([[0], category_sorted])
    return BuiltDataset(
        meta=meta, item_category=item_category, raw_item_ids=item_ids, raw_user_ids=raw_user_ids, data=data
    )
