"""The experiment scripts behind the README's results run end to end on small settings and write what they promise."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import personalization_map
import pytest
import strategies
import torch

SMALL = ["--set", "cloud.pretrain_epochs=1", "--set", "data.eval_negatives=19", "--threads", "1"]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_strategies_table_pairs_runs_and_reports_the_mean_over_seeds(tmp_path: Path) -> None:
    out = tmp_path / "strategies"
    argv = ["--strategies", "cloud_only,dccl", "--seeds", "0,1", "--rounds", "2", "--out", str(out), "--quiet"]
    argv += [*SMALL, "--set", "data.source=synthetic", "--set", "data.num_devices=60"]
    assert strategies.main(argv) == 0
    written = json.loads(out.with_suffix(".json").read_text())
    assert set(written["mean"]) == {"cloud_only", "dccl"}
    for strategy in ("cloud_only", "dccl"):
        seeds = written["runs"][strategy]
        assert [run["seed"] for run in seeds] == [0, 1]
        for r, mean in enumerate(written["mean"][strategy]):
            values = [run["rounds"][r]["cloud_gauc"] for run in seeds]
            assert mean["cloud_gauc"] == pytest.approx(np.mean(values))
            assert mean["cloud_gauc_std"] == pytest.approx(np.std(values, ddof=1))
    # cloud_only never personalizes; dccl starts round 0 from the same broadcast model
    for row in written["mean"]["cloud_only"]:
        assert row["device_gauc"] == row["start_gauc"]
    assert written["mean"]["dccl"][0]["start_gauc"] == written["mean"]["cloud_only"][0]["start_gauc"]
    # paired cloud gain: cloud_only against itself is zero; per-bucket lists end with "all"
    assert all(row["cloud_gain"] == 0.0 for row in written["mean"]["cloud_only"])
    dccl_round = written["runs"]["dccl"][1]["rounds"][1]
    assert dccl_round["cloud_gain"] == pytest.approx(
        dccl_round["cloud_gauc"] - written["runs"]["cloud_only"][1]["rounds"][1]["cloud_gauc"]
    )
    n_columns = len(written["bucket_quantiles"]) + 2
    assert len(dccl_round["bucket_device_gain"]) == n_columns
    assert dccl_round["bucket_device_gain"][-1] == pytest.approx(dccl_round["device_gain"], abs=1e-9)
    table = out.with_suffix(".md").read_text()
    assert "| dccl | 1 |" in table and "paired by seed" in table and "by user activity, round 1" in table
    for name, _ in written["plots"]:
        assert (tmp_path / name).stat().st_size > 10_000


def test_strategies_rejects_an_unknown_strategy() -> None:
    with pytest.raises(SystemExit):
        strategies.parse_args(["--strategies", "dccl,nope"])


def test_personalization_map_writes_tables_and_a_heat_map(tmp_path: Path) -> None:
    out = tmp_path / "map"
    argv = ["--deviations", "0,3", "--seeds", "0", "--devices", "80", "--rounds", "2", "--out", str(out), *SMALL]
    results = personalization_map.main(argv)
    n_columns = len(results["bucket_quantiles"]) + 2  # buckets and "all"
    assert set(results["summary"]) == {"0.0", "3.0"}
    for entry in results["summary"].values():
        assert set(entry["personalization_gain"]) == {1, 2}
        for gains in [*entry["personalization_gain"].values(), entry["momodistill_gain"]]:
            assert len(gains) == n_columns
            assert math.isfinite(gains[-1])
    # a metapatch device model differs from the broadcast model it started from somewhere
    assert any(entry["personalization_gain"][1][-1] != 0 for entry in results["summary"].values())
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "cloud 2 window(s) stale" in out.with_suffix(".md").read_text()
    assert json.loads(out.with_suffix(".json").read_text())["devices"] == 80
