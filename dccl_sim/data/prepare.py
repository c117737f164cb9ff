"""Resolve `data.source` to a dataset directory, building and caching it when needed."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from dccl_sim.config import DataConfig, SimConfig
from dccl_sim.data.build import BuiltDataset, build_dataset
from dccl_sim.data.raw import DataError, RawDataset
from dccl_sim.data.sources.base import SettingsInput, is_dataset_dir, request_for, resolve_source, source_settings
from dccl_sim.data.store import new_temp_path, read_meta, write_dataset
from dccl_sim.progress import Progress
from dccl_sim.sizing import eval_negatives_on_load

# settings that do not change the samples, so they do not change the cache key
_NOT_IN_KEY = {"cache_dir", "pretrain_frac", "windows"}

__all__ = ["build", "cache_key", "check_dataset", "is_dataset_dir", "load_raw", "prepare_dataset", "write_to"]


def load_raw(
    config: DataConfig,
    seed: int,
    num_devices: int | None = None,
    settings: SettingsInput = None,
    on_progress: Progress | None = None,
) -> RawDataset:
    """The raw interactions of the source `config.source` names, called with its request (`num_devices`, when
    given, overrides `config.num_devices`)."""
    source, request = request_for(config, seed, num_devices, settings, on_progress)
    raw = source(request)
    if not isinstance(raw, RawDataset):
        raise DataError(f"data source {config.source!r} returned {type(raw).__name__}, not a RawDataset")
    return raw


def build(
    config: DataConfig, seed: int, settings: SettingsInput = None, on_progress: Progress | None = None
) -> BuiltDataset:
    """Build the dataset in memory (no files written)."""
    raw = load_raw(config, seed, settings=settings, on_progress=on_progress)
    return build_dataset(raw, config, seed, on_progress)


def cache_key(config: DataConfig, seed: int, settings: SettingsInput = None) -> str:
    """The cached dataset's folder name: the source's name and a digest of everything that shapes the samples.

    The digest of an `ml100k` or `synthetic` config is what it was before sources were plug-ins (existing caches and
    the reference runs depend on it): `path` and the source's settings enter it only when there are some.
    """
    source, legacy_path = resolve_source(config.source)
    if source is None:
        raise DataError(f"data.source {config.source!r} is a built dataset; it has no cache key")
    values = config.model_dump(mode="json", exclude=_NOT_IN_KEY | {"path"})
    values["eval_negatives_on_load"] = eval_negatives_on_load(config)  # `auto` and its value: one dataset
    name = config.source
    if legacy_path is not None:  # a bare path in data.source: keyed by where it resolves, named by its last part
        values["source"] = str(legacy_path.resolve())
        name = legacy_path.name
    elif config.path is not None:
        path = Path(config.path).expanduser().resolve()
        values["path"] = str(path)
        name = f"{config.source}-{path.name}"
    if config.source != "synthetic":  # data.synthetic shapes the generator's data only
        values.pop("synthetic")
    resolved = source_settings(source, settings)
    if resolved is not None:
        values["settings"] = resolved.model_dump(mode="json")
    digest = hashlib.sha256(json.dumps([values, seed], sort_keys=True).encode()).hexdigest()[:12]
    return f"{name.replace(':', '.')}-{digest}"  # a module:function reference names no folder


def check_dataset(config: DataConfig) -> None:
    """Raise a DataError, in the time one small read takes, if `data.source` names a built dataset (a folder or URI)
    that cannot be read: a missing folder or bucket, an object store nobody answers, another format version."""
    if is_dataset_dir(config.source):
        read_meta(config.source)


def prepare_dataset(
    config: DataConfig, seed: int, settings: SettingsInput = None, on_progress: Progress | None = None
) -> str:
    """The dataset directory for this config: `source` itself when it is one, else a cached build (`on_progress`
    hears how its generation, negatives and writing go)."""
    if is_dataset_dir(config.source):
        read_meta(config.source)
        return config.source
    root = Path(config.cache_dir).expanduser() / "datasets" / cache_key(config, seed, settings)
    if (root / "meta.json").is_file():
        return str(root)
    write_to(build(config, seed, settings, on_progress), root, cached=True, on_progress=on_progress)
    return str(root)


def source_settings_of(config: SimConfig) -> SettingsInput:
    """The run's data source's own validated settings section (None if it has none)."""
    source, _ = resolve_source(config.data.source)
    return config.section(source) if source is not None else None


def prepare_run_dataset(config: SimConfig, on_progress: Progress | None = None) -> str:
    """`prepare_dataset` for a run's config, with its data source's own settings section."""
    return prepare_dataset(config.data, config.seed, source_settings_of(config), on_progress)


def write_to(built: BuiltDataset, root: Path, cached: bool = False, on_progress: Progress | None = None) -> None:
    """Write atomically: build next to `root`, then rename, so a crash never leaves half a dataset. `cached`: root
    is a cache entry, so a complete dataset another process has put there meanwhile (the same key: the same data)
    is kept, never removed under that process's feet; otherwise, and when incomplete, it is replaced."""
    root.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(new_temp_path(str(root)))
    try:
        write_dataset(built, str(temp), on_progress)
        if cached and (root / "meta.json").is_file():
            return
        if root.exists():
            shutil.rmtree(root)
        try:
            temp.rename(root)
        except OSError:  # another process renamed its build into place first
            if not (cached and (root / "meta.json").is_file()):
                raise
    finally:
        if temp.exists():
            shutil.rmtree(temp)
