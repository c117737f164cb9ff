"""`dccl-sim sweep`: sweep-axis parsing and the grid on hand examples; real two-point sweeps, shared (one process, one
Ray) and isolated (a process and a Ray per point)."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dccl_sim import cli
from dccl_sim.config import ConfigError
from dccl_sim.sweep import build_grid, parse_devices, point_dir, run_sweep, split_axes, write_table

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


def test_sweep_over_two_device_counts_writes_a_row_each_and_the_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute: through the command line, as a user would
    args = ["sweep", "--devices", "20,40", "--out", str(tmp_path)]
    assert cli.main([*args, *(part for item in SMALL for part in ("--set", item))]) == 0
    printed = capsys.readouterr().out

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
        "setup_s",
        "start_memory_mb",
        "sweep_elapsed_s",
    }
    assert expected <= set(table)
    for name in expected - {"mean_t_broadcast_s"}:
        assert all(value > 0 for value in table[name]), name
    # set-up apart from the rounds: each point's wall time holds both; the sweep's elapsed time holds every point's
    for wall, setup, rounds in zip(table["wall_s"], table["setup_s"], table["mean_t_round_s"], strict=True):
        assert setup + rounds < wall
    assert table["sweep_elapsed_s"][1] >= table["wall_s"][0] + table["wall_s"][1] > table["sweep_elapsed_s"][0]
    assert table["isolated"] == [False, False] and table["ray_session"] == [None, None]  # local backend: no Ray
    assert "set-up" in printed and f"2 points in {table['sweep_elapsed_s'][1]:.0f} s: set-up" in printed
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


def _cache_files(cache: Path) -> dict[str, tuple[int, int]]:
    """Every file under the cache: its inode and modification time, which a rebuild or a re-pretraining changes."""
    return {str(p.relative_to(cache)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.rglob("*") if p.is_file()}


def test_a_sweep_over_a_non_device_axis_builds_the_dataset_and_pretrains_once(tmp_path: Path) -> None:
    # Prepare: a fresh cache, two points that differ only in how the devices are packed
    cache = tmp_path / "cache"
    overrides = [*SMALL, f"data.cache_dir={cache}", "runtime.num_actors=1,2"]
    points = build_grid(["20"], overrides, out_dir=tmp_path / "sweep")
    after_point: list[dict[str, tuple[int, int]]] = []

    # Execute
    rows = run_sweep(points, tmp_path / "sweep", on_row=lambda row: after_point.append(_cache_files(cache)))

    # Assert: one dataset, one pretrained cloud, and the second point wrote nothing into the cache
    assert len(list((cache / "datasets").iterdir())) == 1
    assert len(list((cache / "pretrained").glob("*.pt"))) == 1
    assert after_point[1] == after_point[0]
    assert [row["pretrain_cached"] for row in rows] == [False, True]
    assert [row["runtime.num_actors"] for row in rows] == [1, 2]
    assert all(0 < row["setup_s"] < row["wall_s"] for row in rows)


# what a rerun may change: the measured times and memory (everything else is computed from seeds)
MEASURED = re.compile(r"^t_\w+_s$|^device_compute_|^peak_memory_mb$|^compute_s$")


def _assert_same_results(run_a: Path, run_b: Path) -> None:
    for name in ("rounds.parquet", "devices.parquet"):
        a, b = pq.read_table(run_a / name).to_pydict(), pq.read_table(run_b / name).to_pydict()
        assert a.keys() == b.keys()
        for column in a:
            if MEASURED.match(column):
                continue
            if isinstance(a[column][0], float):
                np.testing.assert_allclose(a[column], b[column], atol=1e-5, rtol=0, err_msg=f"{name}: {column}")
            else:
                assert a[column] == b[column], f"{name}: {column}"


def test_a_shared_sweep_runs_on_one_ray_session_an_isolated_one_on_one_per_point_with_the_same_results(
    tmp_path: Path,
) -> None:
    """The isolated points are single runs (a fresh process each, as `dccl-sim run` is): a point inside the shared
    sweep, the second one above all, must give what it gives alone."""
    # Prepare: two points on Ray, one torch thread everywhere so that both ways use the same thread counts
    on_ray = [*SMALL, "runtime.backend=ray", "runtime.torch_threads=1", "runtime.num_actors=1,2"]
    shared_out, isolated_out = tmp_path / "shared", tmp_path / "isolated"

    # Execute: the shared sweep as a user runs it (its own process, which starts Ray); the isolated one from here
    command = [sys.executable, "-m", "dccl_sim.cli", "sweep", "--devices", "8", "--out", str(shared_out)]
    for override in [*on_ray, f"data.cache_dir={tmp_path / 'cache-shared'}"]:
        command += ["--set", override]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    points = build_grid(["8"], [*on_ray, f"data.cache_dir={tmp_path / 'cache-isolated'}"], out_dir=isolated_out)
    run_sweep(points, isolated_out, isolate=True)

    # Assert: one session for the shared points, a session of its own for each isolated point
    shared = pq.read_table(shared_out / "sweep.parquet").to_pydict()
    isolated = pq.read_table(isolated_out / "sweep.parquet").to_pydict()
    assert shared["isolated"] == [False, False] and isolated["isolated"] == [True, True]
    assert len(set(shared["ray_session"])) == 1 and shared["ray_session"][0].startswith("session_")
    assert len(set(isolated["ray_session"])) == 2 and not set(isolated["ray_session"]) & set(shared["ray_session"])
    for a, b in zip(shared["run_dir"], isolated["run_dir"], strict=True):
        _assert_same_results(Path(a), Path(b))
