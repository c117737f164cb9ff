"""The public API a notebook uses: configure, run and read back a simulation from the top level of dccl_sim."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

import dccl_sim


def test_the_public_names_are_importable_from_the_top_level() -> None:
    for name in ("SimConfig", "run", "Strategy", "Recommender", "RoundContext", "Observer", "load_run"):
        assert name in dccl_sim.__all__ and getattr(dccl_sim, name) is not None


def test_run_a_dict_config_and_read_the_run_back(tmp_path: Path) -> None:
    seen: list[int] = []

    class Rounds(dccl_sim.Observer):
        def on_round(self, record, state, cloud_state) -> None:
            seen.append(record.round)

    settings = {
        "strategy": "metapatch",
        "rounds": 2,
        "data": {"num_devices": 6, "eval_negatives": 9},
        "cloud": {"pretrain_epochs": 1},
        "patch": {"bootstrap_epochs": 1},
        "runtime": {"backend": "local"},
        "output": {"out_dir": str(tmp_path / "run"), "progress": False},
    }
    results = dccl_sim.run(settings, observers=[Rounds()])
    assert seen == [0, 1]
    assert isinstance(results.rounds, pd.DataFrame) and list(results.rounds["round"]) == [0, 1]
    assert results.config["strategy"] == "metapatch" and len(results.devices) == 12
    arrow = dccl_sim.load_run(tmp_path / "run", table_format="arrow")
    assert isinstance(arrow.rounds, pa.Table)
    assert arrow.rounds.column("device_gauc").to_pylist() == list(results.rounds["device_gauc"])


def test_bad_settings_and_folders_are_named() -> None:
    with pytest.raises(dccl_sim.ConfigError, match="rounds: Input should be greater than 0"):
        dccl_sim.run({"rounds": 0})
    with pytest.raises(ValueError, match="no such folder"):
        dccl_sim.load_run("/nonexistent/run")
