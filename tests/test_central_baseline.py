"""The centralized benchmark script runs end to end on a small configuration and writes the promised JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import central_baseline as script
import pytest
import torch


def test_small_run_writes_expected_json(tmp_path: Path) -> None:
    out = tmp_path / "central.json"
    threads = torch.get_num_threads()
    try:
        # one thread: with other processes on a 2-core machine, two OpenMP threads can make training 10x slower
        result = script.main(
            [
                "--set",
                "data.num_devices=100",
                "--set",
                "data.eval_negatives=19",
                "--seeds",
                "0",
                "--epochs",
                "1",
                "--out",
                str(out),
                "--threads",
                "1",
                "--quiet",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    written = json.loads(out.read_text())
    assert written["settings"]["seeds"] == [0]
    assert written["settings"]["epochs"] == 1
    assert written["config"]["data"]["num_devices"] == 100
    assert set(written) >= {"settings", "config", "environment", "per_seed", "summary", "total_s"}

    names = ["auc", "gauc", "hr10", "ndcg10", "tail_auc", "tail_gauc", "tail_hr10", "tail_ndcg10"]
    assert script.metric_names(10) == names
    (run,) = written["per_seed"]
    assert run["seed"] == 0
    assert run["devices"] == 100
    assert len(run["train_loss"]) == 1
    assert set(run["timings"]) >= {"train_s", "train_s_per_epoch", "test_eval_s", "valid_eval_s"}
    for scorer in ("model", "popularity"):
        for split in ("valid", "test"):
            assert set(run[scorer][split]) == set(names)
            assert set(written["summary"][split][scorer]) == set(names)
            for stat in written["summary"][split][scorer].values():
                assert set(stat) == {"mean", "std"}
    assert set(written["summary"]["test"]["model_minus_popularity"]) == set(names)

    for split in ("valid", "test"):
        for name in ("auc", "gauc", "hr10", "ndcg10"):
            value = run["model"][split][name]
            assert math.isfinite(value), (split, name, value)
        assert run["model"][split]["auc"] > 0.5
        assert 0.0 <= run["model"][split]["hr10"] <= 1.0
    assert written["summary"]["test"]["model"]["auc"]["mean"] == pytest.approx(run["model"]["test"]["auc"])
    assert written["summary"]["test"]["model"]["auc"]["std"] == 0.0
    assert result["summary"]["test"]["model"]["auc"] == written["summary"]["test"]["model"]["auc"]


def test_bad_seeds_are_rejected() -> None:
    with pytest.raises(SystemExit):
        script.parse_args(["--seeds", "a,b"])
    assert script.parse_args(["--seeds", "3, 4"]).seeds == [3, 4]
