"""Resolve `data.source` to a dataset directory, building and caching it when needed."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from dccl_sim.config import DataConfig
from dccl_sim.data.build import BuiltDataset, build_dataset
from dccl_sim.data.movielens import load_ml100k, load_movielens
from dccl_sim.data.raw import RawDataset
from dccl_sim.data.store import new_temp_path, read_meta, write_dataset
from dccl_sim.data.synthetic import generate_synthetic

# settings that do not change the samples, so they do not change the cache key
_NOT_IN_KEY = {"cache_dir", "pretrain_frac", "windows"}


def load_raw(config: DataConfig, seed: int, num_devices: int | None = None) -> RawDataset:
    """The raw interactions `config.source` names (`ml100k`, `synthetic`, or a MovieLens path)."""
    if config.source == "ml100k":
        return load_ml100k(Path(config.cache_dir).expanduser())
    if config.source == "synthetic":
        return generate_synthetic(config.synthetic, num_devices or config.num_devices or 1000, seed)
    return load_movielens(Path(config.source).expanduser())


def build(config: DataConfig, seed: int) -> BuiltDataset:
    """Build the dataset in memory (no files written)."""
    return build_dataset(load_raw(config, seed), config, seed)


def is_dataset_dir(source: str) -> bool:
    return "://" in source or (Path(source).expanduser() / "meta.json").is_file()


def cache_key(config: DataConfig, seed: int) -> str:
    values = config.model_dump(mode="json", exclude=_NOT_IN_KEY)
    if config.source not in ("ml100k", "synthetic"):
        values["source"] = str(Path(config.source).expanduser().resolve())
    if config.source != "synthetic":
        values.pop("synthetic")
    digest = hashlib.sha256(json.dumps([values, seed], sort_keys=True).encode()).hexdigest()[:12]
    name = config.source if config.source in ("ml100k", "synthetic") else Path(config.source).name
    return f"{name}-{digest}"


def prepare_dataset(config: DataConfig, seed: int) -> str:
    """The dataset directory for this config: `source` itself when it is one, else a cached build."""
    if is_dataset_dir(config.source):
        read_meta(config.source)
        return config.source
    root = Path(config.cache_dir).expanduser() / "datasets" / cache_key(config, seed)
    if (root / "meta.json").is_file():
        return str(root)
    write_to(build(config, seed), root)
    return str(root)


def write_to(built: BuiltDataset, root: Path) -> None:
    """Write atomically: build next to `root`, then rename, so a crash never leaves half a dataset."""
    root.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(new_temp_path(str(root)))
    try:
        write_dataset(built, str(temp))
        if root.exists():
            shutil.rmtree(root)
        temp.rename(root)
    finally:
        if temp.exists():
            shutil.rmtree(temp)
