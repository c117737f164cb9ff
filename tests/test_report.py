"""`dccl-sim report`: report.md, report.html and the plots from a real small run, and clear errors for folders that
are not runs."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import struct
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dccl_sim import cli
from dccl_sim.config import load_config
from dccl_sim.report import HTML, PLOTS, _fmt, write_report
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


def test_report_html_is_one_offline_page_with_every_plot_and_the_tables(run_dir: Path) -> None:
    # Execute
    write_report(run_dir)

    # Assert: each plot embedded as the very PNG written beside the report, under its section's title
    page = (run_dir / HTML).read_text()
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]+)"', page)
    embedded = {title: base64.b64decode(data) for data, title in images}
    assert len(embedded) == len(PLOTS)
    markdown = (run_dir / "report.md").read_text()
    for filename in PLOTS.values():
        title = re.search(rf"!\[([^\]]+)\]\({re.escape(filename)}\)", markdown).group(1)
        assert embedded[title] == (run_dir / filename).read_bytes(), filename
    metrics_png = embedded[next(t for t in embedded if t.startswith("GAUC"))]
    assert metrics_png[:8] == PNG_SIGNATURE
    assert struct.unpack(">II", metrics_png[16:24]) == (1200, 504)  # IHDR: a 10 × 4.2 in figure at 120 dpi

    # the rounds tables' values, in table cells
    rounds = pq.read_table(run_dir / "rounds.parquet").to_pydict()
    for column in ("device_gauc", "cloud_gauc", "t_round_s"):
        for value in rounds[column]:
            cell = format(value, ".4f" if column.endswith("gauc") else ".3g")
            assert f'<td style="text-align:right">{cell}</td>' in page, (column, cell)
    assert page.count("<table>") == markdown.count("\n|---")

    # nothing fetched from elsewhere: no URL, script, external style sheet or link
    without_images = re.sub(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', "", page)
    for outside in ("http:", "https:", "<script", "<link", "@import", "url(", "href=", "src="):
        assert outside not in without_images.lower(), outside


def test_report_command_exits_0_and_prints_both_pages(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run_dir / HTML).unlink(missing_ok=True)
    assert cli.main(["report", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert str(run_dir / "report.md") in printed
    assert str(run_dir / HTML) in printed
    assert (run_dir / HTML).is_file()


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
