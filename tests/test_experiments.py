"""The experiment scripts behind the README's results run end to end on small settings and write what they promise."""

from __future__ import annotations

import json
import math
from pathlib import Path

import central_baseline
import numpy as np
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
    _check_personalization_gain_against_broadcast(written, table)
    _check_ranking_columns(written, table)


def _markdown_table(text: str, heading: str) -> list[dict[str, str]]:
    """The rows (header → cell) of the first markdown table after `heading`."""
    lines = text[text.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)))
    return rows


def _pm(mean: float, std: float) -> str:
    return f"{mean:+.4f} ± {std:.4f}"


def _check_personalization_gain_against_broadcast(written: dict, table: str) -> None:
    """The headline gain is device − broadcast (the plain W_t), device − start the second figure; dccl starts from W_t
    plus its starting meta-patch, so on this tiny run the two differ and a table still showing device − start fails."""
    for strategy, seeds in written["runs"].items():
        for run in seeds:
            for r, row in enumerate(run["rounds"]):
                assert row["device_gain_vs_broadcast"] == pytest.approx(row["device_gauc"] - row["broadcast_gauc"])
                assert row["tail_device_gain_vs_broadcast"] == pytest.approx(
                    row["tail_device_gauc"] - row["tail_broadcast_gauc"]
                )
                assert row["device_gain"] == pytest.approx(row["device_gauc"] - row["start_gauc"])  # the old meaning
                # per bucket from devices.parquet's broadcast_auc, pooled like the round's broadcast_gauc
                assert row["bucket_broadcast_gauc"][-1] == pytest.approx(row["broadcast_gauc"], abs=1e-9)
                assert row["bucket_device_gain_vs_broadcast"][-1] == pytest.approx(
                    row["device_gain_vs_broadcast"], abs=1e-9
                )
                if r > 0:  # every device participates: round t broadcasts round t-1's updated cloud
                    assert row["broadcast_gauc"] == pytest.approx(run["rounds"][r - 1]["cloud_gauc"])
            if strategy == "cloud_only":  # the devices keep the broadcast model
                assert all(row["device_gain_vs_broadcast"] == 0.0 for row in run["rounds"])
    dccl = written["runs"]["dccl"]
    assert any(row["start_gauc"] != pytest.approx(row["broadcast_gauc"]) for run in dccl for row in run["rounds"])
    gauc = [row for row in _markdown_table(table, "## GAUC") if row["strategy"] == "dccl"]
    buckets = _markdown_table(table, "## Personalization gain (device − broadcast GAUC) by user activity, round 1")
    differs = False
    for row, mean in zip(gauc, written["mean"]["dccl"], strict=True):
        headline = _pm(mean["device_gain_vs_broadcast"], mean["device_gain_vs_broadcast_std"])
        assert row["Δ = device − broadcast"] == headline
        assert row["device − start"] == _pm(mean["device_gain"], mean["device_gain_std"])
        assert row["tail Δ"] == _pm(mean["tail_device_gain_vs_broadcast"], mean["tail_device_gain_vs_broadcast_std"])
        assert row["broadcast"] == f"{mean['broadcast_gauc']:.4f} ± {mean['broadcast_gauc_std']:.4f}"
        differs |= row["Δ = device − broadcast"] != row["device − start"]
    assert differs
    assert next(row for row in buckets if row["strategy"] == "dccl")["all"] == gauc[1]["Δ = device − broadcast"]


def _check_ranking_columns(written: dict, table: str) -> None:
    """HR/NDCG at every cut-off and MRR per model in the JSON (the *10 aliases kept); HR@10, NDCG@10 and MRR of the
    broadcast, device and cloud models in the table."""
    row = written["runs"]["dccl"][0]["rounds"][1]
    for model in ("broadcast", "start", "device", "cloud"):
        for tail in ("", "tail_"):
            for k in (5, 10, 20):
                assert 0.0 <= row[f"{tail}{model}_hr@{k}"] <= 1.0
                assert row[f"{tail}{model}_ndcg@{k}"] <= row[f"{tail}{model}_hr@{k}"]
            assert 0.0 < row[f"{tail}{model}_mrr"] <= 1.0
    for model in ("start", "device", "cloud"):
        assert row[f"{model}_hr10"] == row[f"{model}_hr@10"] and row[f"{model}_ndcg10"] == row[f"{model}_ndcg@10"]
    ranking = _markdown_table(table, "## HR@10, NDCG@10 and MRR")
    mean = written["mean"]["dccl"][1]
    dccl = next(r for r in ranking if r["strategy"] == "dccl" and r["round"] == "1")
    for metric, name in (("HR@10", "hr@10"), ("NDCG@10", "ndcg@10"), ("MRR", "mrr")):
        for model in ("broadcast", "device", "cloud"):
            expected = f"{mean[f'{model}_{name}']:.4f} ± {mean[f'{model}_{name}_std']:.4f}"
            assert dccl[f"{metric} {model}"] == expected


def test_strategies_markdown_still_renders_a_file_without_the_broadcast_columns(tmp_path: Path) -> None:
    """A JSON written before the broadcast baseline and the @K names: its ranking numbers through the *10 aliases,
    "—" where it has no broadcast model, and its per-bucket gain labelled device − start."""
    out = tmp_path / "strategies"
    argv = ["--strategies", "cloud_only,metapatch", "--seeds", "0", "--rounds", "1", "--out", str(out), "--quiet"]
    assert strategies.main([*argv, *SMALL, "--set", "data.source=synthetic", "--set", "data.num_devices=40"]) == 0
    written = json.loads(out.with_suffix(".json").read_text())
    for rows in written["mean"].values():
        for row in rows:
            for name in [n for n in row if "broadcast" in n or "@" in n or n.endswith(("mrr", "mrr_std"))]:
                del row[name]
    table = strategies.markdown(written)
    assert "by user activity, round 0" in table and "predates the broadcast baseline" in table
    metapatch = next(r for r in _markdown_table(table, "## GAUC") if r["strategy"] == "metapatch")
    assert metapatch["broadcast"] == "—" and metapatch["Δ = device − broadcast"] == "—"
    assert metapatch["device − start"] == f"{written['mean']['metapatch'][0]['device_gain']:+.4f}"
    ranking = next(r for r in _markdown_table(table, "## HR@10, NDCG@10 and MRR") if r["strategy"] == "metapatch")
    assert ranking["HR@10 device"] == f"{written['mean']['metapatch'][0]['device_hr10']:.4f}"
    assert ranking["MRR device"] == "—"


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
