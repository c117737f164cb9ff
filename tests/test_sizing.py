"""Settings that only matter at scale choose themselves from the dataset's size; explicit values are honoured and a
run's config.json says what `auto` became."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN

from dccl_sim import sizing
from dccl_sim.config import load_config
from dccl_sim.data.build import build_dataset
from dccl_sim.data.prepare import cache_key
from dccl_sim.data.synthetic import generate_synthetic
from dccl_sim.models.base import ModelSpec
from dccl_sim.models.din import DIN
from dccl_sim.models.training import fit
from dccl_sim.runtime.session import run


@pytest.mark.parametrize(
    ("devices", "table", "eval_devices"),
    [(943, "adam", None), (10_000, "adam", None), (10_001, "lazy", 10_000), (1_000_000, "lazy", 10_000)],
)
def test_auto_settings_follow_the_number_of_devices(devices: int, table: str, eval_devices: int | None) -> None:
    config = load_config(None, [])
    resolved = sizing.for_dataset(config, devices)
    assert resolved.patch.bootstrap_table == table
    assert resolved.metrics.eval_devices == eval_devices
    assert sizing.for_dataset(resolved, devices) == resolved  # idempotent
    assert config.patch.bootstrap_table == "auto"  # the original is untouched


def test_explicit_values_are_honoured_at_any_size() -> None:
    explicit = ["patch.bootstrap_table=adam", "metrics.eval_devices=500", "data.eval_negatives_on_load=false"]
    config = load_config(None, [*explicit, "data.num_devices=1000000"])
    resolved = sizing.for_dataset(config, 1_000_000)
    assert (resolved.patch.bootstrap_table, resolved.metrics.eval_devices) == ("adam", 500)
    assert resolved.data.eval_negatives_on_load is False


@pytest.mark.parametrize(("requested", "on_load"), [(None, False), (20_000, False), (20_001, True)])
def test_evaluation_negatives_are_drawn_on_load_above_a_requested_size(requested: int | None, on_load: bool) -> None:
    devices = [] if requested is None else [f"data.num_devices={requested}"]
    config = load_config(None, ["data.source=synthetic", *devices])
    assert sizing.eval_negatives_on_load(config.data) is on_load
    # `auto` and the value it resolves to name one cached dataset: a resumed run (its config.json resolved) finds it
    explicit = config.data.model_copy(update={"eval_negatives_on_load": on_load})
    assert cache_key(config.data, 0) == cache_key(explicit, 0)
    other = config.data.model_copy(update={"eval_negatives_on_load": not on_load})
    assert cache_key(config.data, 0) != cache_key(other, 0)


def test_a_run_writes_what_auto_became(tmp_path: Path) -> None:
    run(load_config(None, [*TINY_RUN, "rounds=1", "runtime.backend=local", f"output.out_dir={tmp_path}"]))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["patch"]["bootstrap_table"] == "adam"
    assert saved["metrics"]["eval_devices"] is None
    assert saved["data"]["eval_negatives_on_load"] is False
    assert saved["cloud"]["workers"] == 1


def test_a_pretraining_budget_stops_within_an_epoch() -> None:
    torch.manual_seed(0)
    config = load_config(None, ["data.source=synthetic", "data.num_devices=60", "data.eval_negatives=9"])
    built = build_dataset(generate_synthetic(config.data.synthetic, 60, 0), config.data, 0)
    meta = built.meta
    spec = ModelSpec(meta.num_items, meta.num_categories, tuple(meta.profile_cardinalities), built.item_category)
    indices = np.flatnonzero(built.data.split == 0)
    assert len(indices) > 300
    batches: list[tuple[int, int]] = []
    losses = fit(
        DIN(spec, config.model),
        built.data,
        indices,
        epochs=3,
        batch_size=64,
        lr=1e-3,
        history_len=5,
        seed_keys=(0,),
        on_batch=lambda done, total: batches.append((done, total)),
        max_samples=200,
    )
    assert batches == [(1, 4), (2, 4), (3, 4), (4, 4)]  # ceil(200 / 64) minibatches, the first epoch unfinished
    assert len(losses) == 1 and np.isfinite(losses[0])
