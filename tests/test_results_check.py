"""`make results-check` re-runs one cell of each published results file and names what moved: here on small files
made by the experiment scripts themselves, untouched (everything reproduces) and with one figure altered."""

from __future__ import annotations

import json
from pathlib import Path

import central_baseline
import personalization_map
import pytest
import results_check
import strategies
import torch

SMALL = ["--set", "cloud.pretrain_epochs=1", "--set", "data.eval_negatives=19", "--threads", "1"]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_every_kind_of_results_file_reproduces_and_an_altered_figure_is_named(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(results_check, "RESULTS", tmp_path)
    synthetic = ["--set", "data.source=synthetic", "--set", "data.num_devices=40"]
    table = ["--strategies", "cloud_only,dccl", "--seeds", "1", "--rounds", "2", "--quiet", *SMALL, *synthetic]
    strategies.main([*table, "--out", str(tmp_path / "strategies_small")])
    heat_map = ["--deviations", "2", "--seeds", "0", "--devices", "60", "--rounds", "1", *SMALL]
    personalization_map.main([*heat_map, "--out", str(tmp_path / "personalization_map")])
    central = ["--set", "data.num_devices=60", "--set", "data.eval_negatives=19", "--seeds", "3", "--epochs", "1"]
    central_baseline.main([*central, "--threads", "1", "--quiet", "--out", str(tmp_path / "central_baseline.json")])
    capsys.readouterr()
    assert results_check.published() == ["central_baseline", "personalization_map", "strategies_small"]

    assert results_check.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["same"] * 3, lines
    assert "strategies_small.json: dccl seed 1 round 0" in lines[2]
    assert "personalization_map.json: deviation 2 seed 0" in lines[1]
    assert "central_baseline.json: seed 3, 1 epochs" in lines[0]
    compared = {line.split(": ")[0]: int(line.split(": ")[-1].split()[0]) for line in lines}
    assert compared["same   central_baseline.json"] == 32  # 2 scorers × 2 splits × (4 overall + 4 tail)
    assert compared["same   personalization_map.json"] >= 2

    path = tmp_path / "central_baseline.json"
    written = json.loads(path.read_text())
    written["per_seed"][0]["model"]["test"]["gauc"] += 0.01
    path.write_text(json.dumps(written))
    assert results_check.main(["--files", "central_baseline"]) == 1
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("MOVED  central_baseline.json") and "model test gauc" in line


def test_unknown_or_missing_results_files_are_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(results_check, "RESULTS", tmp_path)
    (tmp_path / "packed_speedup.json").write_text("{}")
    with pytest.raises(SystemExit):
        results_check.main(["--files", "nope"])
    with pytest.raises(SystemExit):
        results_check.main(["--files", "packed_speedup"])
