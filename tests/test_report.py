"""`dccl-sim report`: report.md and its plots from a real small run, and clear errors for folders that are not runs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dccl_sim import cli
from dccl_sim.config import load_config
from dccl_sim.report import PLOTS, _fmt, write_report
from dccl_sim.results import RunDirectoryError
from dccl_sim.runtime.session import run

SMALL = [
    "data.source=synthetic",
    "data.num_devices=30",
    "data.eval_negatives=9",
    "rounds=2",
    "cloud.pretrain_epochs=1",
    "patch.bootstrap_epochs=1",
    "runtime.backend=local",
    "output.progress=false",
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    run(load_config(None, [*SMALL, f"output.out_dir={out}"]))
    return out


def test_report_writes_markdown_with_tables_and_linked_plots(run_dir: Path) -> None:
    # Execute
    path = write_report(run_dir)

    # Assert
    assert path == run_dir / "report.md"
    text = path.read_text()
    assert "- **strategy**: dccl" in text
    assert "- **devices**: 30" in text
    for heading in ("## Metrics per round", "## Latency per round"):
        assert heading in text
    for round_index in (0, 1):
        assert text.count(f"\n| {round_index} | ") == 3  # GAUC, ranking and latency tables
    for filename in PLOTS.values():
        assert f"]({filename})" in text
        png = run_dir / filename
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        assert png.stat().st_size > 10_000, f"{filename} looks empty"


def test_report_command_exits_0_on_a_run(run_dir: Path) -> None:
    assert cli.main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.md").is_file()


def test_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RunDirectoryError, match="not a run directory"):
        write_report(tmp_path)
    with pytest.raises(RunDirectoryError, match="no such folder"):
        write_report(tmp_path / "missing")
    assert cli.main(["report", str(tmp_path)]) == 2


def test_a_run_without_rounds_is_a_clear_error(run_dir: Path, tmp_path: Path) -> None:
    # Prepare: a run directory that has its config but no finished round, then an empty rounds table
    shutil.copy(run_dir / "config.json", tmp_path / "config.json")

    # Execute / Assert
    with pytest.raises(RunDirectoryError, match="no finished round"):
        write_report(tmp_path)
    empty = pq.read_table(run_dir / "rounds.parquet").slice(0, 0)
    pq.write_table(empty, tmp_path / "rounds.parquet")
    with pytest.raises(RunDirectoryError, match="holds no rounds"):
        write_report(tmp_path)
    assert cli.main(["report", str(tmp_path)]) == 2
    assert json.loads((tmp_path / "config.json").read_text())["strategy"] == "dccl"


def test_table_cells_show_missing_values_as_a_dash() -> None:
    assert _fmt(math.nan, ".4f") == "—"
    assert _fmt(0.123456, ".4f") == "0.1235"
    assert _fmt(7, "d") == "7"
