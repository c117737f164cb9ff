"""`dccl-sim sweep`: sweep-axis parsing and the grid on hand examples, and one real two-point sweep."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dccl_sim import cli
from dccl_sim.config import ConfigError
from dccl_sim.sweep import build_grid, parse_devices, point_dir, split_axes, write_table

SMALL = [
    "data.eval_negatives=9",
    "rounds=1",
    "cloud.pretrain_epochs=1",
    "patch.bootstrap_epochs=1",
    "runtime.backend=local",
    "output.progress=false",
]


def test_commas_make_an_axis_unless_the_value_is_a_list_or_quoted() -> None:
    overrides = [
        "runtime.num_actors=1,2",
        "rounds=2",
        "model.mlp_hidden=[200,80]",
        "device.local_epochs= 1, 2 ,3",
        "data.source='a,b'",
        "seed=7",
    ]
    fixed, axes = split_axes(overrides)
    assert fixed == ["rounds=2", "model.mlp_hidden=[200,80]", "data.source='a,b'", "seed=7"]
    assert axes == {"runtime.num_actors": ["1", "2"], "device.local_epochs": ["1", "2", "3"]}


def test_bad_sweep_lists_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="empty value"):
        split_axes(["seed=1,,2"])
    with pytest.raises(ConfigError, match="swept twice"):
        split_axes(["seed=1,2", "seed=3,4"])
    assert parse_devices("10,100, 1000") == ["10", "100", "1000"]
    for text in ("10,0", "10,x", "", "-5"):
        with pytest.raises(ConfigError, match="--devices"):
            parse_devices(text)


def test_the_grid_is_the_product_of_devices_and_the_other_axes(tmp_path: Path) -> None:
    points = build_grid(["10", "20"], [*SMALL, "runtime.num_actors=1,2"], out_dir=tmp_path)
    assert [p.values for p in points] == [
        {"data.num_devices": "10", "runtime.num_actors": "1"},
        {"data.num_devices": "10", "runtime.num_actors": "2"},
        {"data.num_devices": "20", "runtime.num_actors": "1"},
        {"data.num_devices": "20", "runtime.num_actors": "2"},
    ]
    last = points[-1].config
    assert (last.data.num_devices, last.runtime.num_actors, last.rounds) == (20, 2, 1)
    assert last.data.source == "synthetic"  # the sweep's default source
    assert Path(last.output.out_dir) == tmp_path / "devices=20" / "runtime.num_actors=2"
    assert point_dir({"data.num_devices": "5"}) == "devices=5"


def test_a_named_source_is_kept_and_conflicts_fail_before_running(tmp_path: Path) -> None:
    config_file = tmp_path / "sim.toml"
    config_file.write_text('[data]\nsource = "ml100k"\n')
    assert build_grid(["10"], SMALL, config_file)[0].config.data.source == "ml100k"
    assert build_grid(["10"], [*SMALL, "data.source=ml100k"])[0].config.data.source == "ml100k"
    with pytest.raises(ConfigError, match="not both"):
        build_grid(["10"], ["data.num_devices=5"])
    with pytest.raises(ConfigError, match=r"runtime\.participation"):
        build_grid(["10"], ["runtime.participation=0.5,2"])  # the second point is invalid


def test_mixed_value_types_become_a_text_column(tmp_path: Path) -> None:
    write_table([{"runtime.devices_per_actor": 1}, {"runtime.devices_per_actor": "auto"}], tmp_path / "t.parquet")
    assert pq.read_table(tmp_path / "t.parquet").to_pydict() == {"runtime.devices_per_actor": ["1", "auto"]}


def test_sweep_over_two_device_counts_writes_a_row_each_and_the_plot(tmp_path: Path) -> None:
    # Execute: through the command line, as a user would
    args = ["sweep", "--devices", "20,40", "--out", str(tmp_path)]
    assert cli.main([*args, *(part for item in SMALL for part in ("--set", item))]) == 0

    # Assert
    table = pq.read_table(tmp_path / "sweep.parquet").to_pydict()
    assert table["n_devices"] == [20, 40]
    assert table["data.num_devices"] == [20, 40]
    assert table["rounds"] == [1, 1]
    expected = {
        "mean_t_round_s",
        "mean_t_devices_s",
        "mean_t_distill_s",
        "mean_t_eval_s",
        "mean_t_broadcast_s",
        "mean_sim_round_s",
        "devices_per_s",
        "samples_per_s",
        "peak_memory_mb",
        "max_round_memory_mb",
        "wall_s",
    }
    assert expected <= set(table)
    for name in expected - {"mean_t_broadcast_s"}:
        assert all(value > 0 for value in table[name]), name
    for count in (20, 40):
        assert (tmp_path / f"devices={count}" / "rounds.parquet").is_file()
    png = tmp_path / "sweep_latency.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # the page: the table's rows and the plot embedded, readable offline
    page = (tmp_path / "sweep.html").read_text()
    for count, seconds in zip((20, 40), table["mean_t_round_s"], strict=True):
        assert f'<td style="text-align:right">{count}</td>' in page
        assert f'<td style="text-align:right">{seconds:.3g}</td>' in page
    embedded = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [base64.b64decode(data) for data in embedded] == [png.read_bytes()]
    assert "](sweep_latency.png)" in (tmp_path / "sweep.md").read_text()
