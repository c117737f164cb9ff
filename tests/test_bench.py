"""The benchmark harness (`make bench`, experiments/bench): each part's quick path on tiny sizes writes well-formed
results; the exponent fit and the skip reason on hand examples. Behaviour only: no wall-clock bounds."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from bench import cli, flower, scaling
from bench.common import _git_commit
from bench.device_phase import actor_skip_reason
from bench.table import render

SMALL = ["--quick", "--set", "data.eval_negatives=9"]
# a result file's envelope, for rendering a part's table from hand-made results
ENVELOPE = {
    "quick": True,
    "repeats": 1,
    "machine": {"cpu": "CPU", "logical_cores": 2, "ram_gib": 8.0},
    "versions": {"torch": "2", "ray": "2", "dccl_sim_commit": "abc"},
    "load_average_start": [1.0, 1.0, 1.0],
    "load_average_end": [1.0, 1.0, 1.0],
}


def run(tmp_path: Path, *argv: str) -> dict[str, dict[str, Any]]:
    """Run the harness into tmp_path; every result file it wrote, by part."""
    assert cli.main([*SMALL, "--out", str(tmp_path), "--work-dir", str(tmp_path / "work"), *argv]) == 0
    return {path.stem: json.loads(path.read_text()) for path in tmp_path.glob("*.json")}


def assert_recorded(payload: dict[str, Any], part: str) -> None:
    """The envelope every result file carries: command, machine, versions, load average."""
    assert payload["part"] == part
    assert payload["command"].startswith("python -m bench --quick")
    assert payload["quick"] is True
    assert payload["machine"]["logical_cores"] >= 1 and payload["machine"]["ram_gib"] > 0
    assert {"torch", "ray", "python", "dccl_sim_commit"} <= set(payload["versions"])
    assert len(payload["load_average_start"]) == len(payload["load_average_end"]) == 3
    assert payload["wall_s"] > 0


def test_exponent_of_a_power_law_and_which_points_it_fits() -> None:
    devices = [1_000, 10_000, 100_000, 1_000_000]
    assert scaling.scaling_exponent(devices, [3 * n**0.5 for n in devices]) == pytest.approx(0.5)
    rows = [
        {"n_devices": n, "mean_t_round_s": t, "mean_t_devices_s": t / 2, "max_round_memory_mb": 100.0 + n / 1000}
        for n, t in zip(devices, [50.0, 1.0, 10.0, 100.0], strict=True)
    ]
    fitted = scaling.fit(rows, fit_from=10_000)  # the 1,000-device point (far off the line) is left out
    assert fitted["fit_devices"] == [10_000, 100_000, 1_000_000]
    assert fitted["exponents"]["t_round_s"] == pytest.approx(1.0)
    assert fitted["exponents"]["t_devices_s"] == pytest.approx(1.0)
    assert scaling.fit(rows[:2], fit_from=10_000)["fit_devices"] == [1_000, 10_000]  # fewer than two: every point
    assert scaling.fit(rows[:1], fit_from=10_000)["exponents"] is None


def test_a_commit_is_dirty_for_changed_code_but_not_for_the_benchmarks_own_results(tmp_path: Path) -> None:
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True)
        return done.stdout.strip()

    bench_dir, results = tmp_path / "bench", tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    (bench_dir / "code.py").write_text("a = 1\n")
    (results / "part.json").write_text("{}\n")
    (tmp_path / "top.py").write_text("b = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    commit = git("rev-parse", "--short", "HEAD")
    assert _git_commit(bench_dir) == commit
    (results / "part.json").write_text('{"rewritten": true}\n')
    (bench_dir / "untracked.txt").write_text("new\n")
    assert _git_commit(bench_dir) == commit
    (tmp_path / "top.py").write_text("b = 2\n")  # outside the bench folder counts too
    assert _git_commit(bench_dir) == f"{commit}-dirty"


def test_skipped_actor_counts_say_how_much_memory_they_would_take() -> None:
    assert actor_skip_reason(100, 32, 280.0, 23.5) == (
        "skipped: 100 actors × ~280 MB = 27.3 GiB > RAM 23.5 GiB; one actor per device is measured at 32 devices only"
    )
    assert "≤ RAM" in actor_skip_reason(50, 32, 280.0, 23.5)
    assert "--actor-devices 0" in actor_skip_reason(100, 0, None, 23.5)


def test_ceiling_and_flower(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flower, "FLOWER_PYTHON", tmp_path / "no-env" / "bin" / "python")  # CI has no .venv-flower
    results = run(tmp_path, "--parts", "ceiling,flower", "--matmul-sizes", "64,128", "--repeats", "2")
    assert set(results) == {"ceiling", "flower"}
    assert_recorded(results["ceiling"], "ceiling")
    ceiling = results["ceiling"]["results"]
    assert [(row["n"], len(row["seconds"])) for row in ceiling["measurements"] if row["threads"] == 1] == [
        (64, 2),
        (128, 2),
    ]
    assert ceiling["ceiling_flops_one_thread"] > 0 and ceiling["ceiling_flops_all_threads"] > 0
    assert_recorded(results["flower"], "flower")
    missing = results["flower"]["results"]
    assert missing["status"] == "not installed" and "ray==2.55.1" in missing["reason"]
    assert "make bench-flower-env" in missing["reason"]
    table = (tmp_path / "README_table.md").read_text()
    assert "Quick run" in table and "Hardware ceiling" in table
    assert "**Flower** side by side: not installed" in table


def flower_result(devices: list[int]) -> dict[str, Any]:
    """What `bench.flower_sim` writes, its figures made up (only the fields the table reads, and the status)."""

    def variant(ms: float) -> dict[str, Any]:
        return {"ms_per_device_excluded": ms, "ms_per_device_included": 10 * ms, "actors": 2}

    points = [
        {
            "devices": n,
            "flower": {
                "ms_per_client_excluded": 20.0,
                "ms_per_client_included": 200.0,
                "client_step_ms": 9.0,
                "engine_overhead_ms_per_client": 11.0,
                "actors": 1,
                "torch_threads": [2],
                "max_abs_theta_diff": 2e-9,
            },
            "packed_in_process": variant(0.5),
            "packed_ray": {**variant(1.0), "max_abs_theta_diff": 0.0},
            "flower_over_dccl_sim": {
                "packed_in_process": {"excluded": 40.0, "included": 40.0},
                "packed_ray": {"excluded": 20.0, "included": 20.0},
            },
        }
        for n in devices
    ]
    return {
        "status": "measured",
        "flwr_version": "1.41.0",
        "environment": {"ray": "2.55.1"},
        "client_resources": {"num_cpus": 2.0, "num_gpus": 0.0},
        "points": points,
    }


def test_flower_runs_in_its_environment_and_its_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in for .venv-flower's python: it records its arguments and writes a result as bench.flower_sim
    would, so the harness's side of part 5 is checked without Flower."""
    fake = tmp_path / "env" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "argv = sys.argv[1:]\n"
        f"open({str(tmp_path / 'argv.json')!r}, 'w').write(json.dumps(argv))\n"
        f"result = {flower_result([3, 4])!r}\n"
        "open(argv[argv.index('--out') + 1], 'w').write(json.dumps(result))\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(flower, "FLOWER_PYTHON", fake)
    payload = run(tmp_path, "--parts", "flower", "--flower-devices", "3,4")["flower"]
    assert_recorded(payload, "flower")
    assert payload["results"] == flower_result([3, 4])
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[:6] == ["-m", "bench.flower_sim", "--devices", "3", "4", "--repeats"]
    assert argv[argv.index("--client-cpus") + 1] == "1.0"
    assert "data.source=synthetic" in argv and "data.eval_negatives=9" in argv  # the device phase's setting
    table = (tmp_path / "README_table.md").read_text()
    assert "| 3 | packed, in-process, 1 thread | 20 | 200 | 0.5 | 5 | 40× | 40× | 2.0e-09 |" in table
    assert "| 4 | packed, Ray, default placement, 2 actors | 20 | 200 | 1 | 10 | 20× | 20× | 2.0e-09 |" in table
    assert "| 4 | 1 × 2 | 9 | 11 |" in table


def test_a_failing_flower_run_is_recorded(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho Flower broke >&2\nexit 3\n")
    fake.chmod(0o755)
    result = flower.measure([5], [], 1, 2.0, tmp_path / "log" / "flower_sim.log", python=fake)
    assert result["status"] == "failed" and "exited with 3" in result["reason"]
    assert "Flower broke" in result["log_tail"]
    assert "**Flower** side by side: failed" in render({"flower": {**ENVELOPE, "results": result}})


def test_device_phase(tmp_path: Path, ray_session) -> None:
    argv = ["--parts", "ceiling,device_phase", "--matmul-sizes", "64", "--devices", "12", "--actor-devices", "2"]
    payload = run(tmp_path, *argv)["device_phase"]
    assert_recorded(payload, "device_phase")
    points = payload["results"]["points"]
    assert [p["devices"] for p in points] == [2, 12]
    for point in points:
        assert point["samples_trained"] > 0 and point["local_samples_per_device"] > 0
        assert point["flops_counted"]["total"] > point["flops_counted"]["training"] > 0
        assert point["flops_modelled"] > 0
        variants = point["variants"]
        for name in ("packed_in_process", "packed_training", "loop", "packed_ray"):
            assert variants[name]["wall_s"] > 0 and variants[name]["samples_per_s"] > 0
            assert variants[name]["fraction_of_ceiling"] > 0
        assert set(variants["packed_in_process"]["phases"]) == {"features", "training", "evaluation_and_rest"}
        # every placement ran the same computation
        assert variants["loop"]["max_abs_theta_diff"] <= 1e-5
        assert variants["packed_ray"]["max_abs_theta_diff"] <= 1e-5
        assert variants["packed_ray"]["same_samples_trained"]
    measured, skipped = points[0]["variants"]["actor_per_device_ray"], points[1]["variants"]["actor_per_device_ray"]
    assert measured["actors"] == 2 and measured["memory_per_actor_mb"] > 0
    assert measured["max_abs_theta_diff"] <= 1e-5
    assert skipped["skipped"].startswith("skipped: 12 actors × ~")
    table = (tmp_path / "README_table.md").read_text()
    assert "| 12 | one actor per device, Ray | skipped: 12 actors" in table


def test_scaling(tmp_path: Path) -> None:
    argv = ["--parts", "scaling", "--scaling-devices", "20,40", "--set", "runtime.backend=local"]
    payload = run(tmp_path, *argv)["scaling"]
    assert_recorded(payload, "scaling")
    results = payload["results"]
    assert [p["n_devices"] for p in results["points"]] == [20, 40] and results["not_measured"] == []
    for point in results["points"]:
        assert point["mean_t_round_s"] > 0 and point["mean_t_devices_s"] > 0
        assert point["peak_memory_mb"] > 0 and point["max_round_memory_mb"] > 0
        assert point["mean_participants"] == point["n_devices"]
    assert results["fit_devices"] == [20, 40]
    assert all(math.isfinite(a) for a in results["exponents"].values())
    assert (tmp_path / "scaling_latency.png").stat().st_size > 10_000
    assert "Scaling exponent" in (tmp_path / "README_table.md").read_text()


def test_a_failing_scaling_point_is_recorded_and_larger_ones_skipped(tmp_path: Path) -> None:
    argv = ["--parts", "scaling", "--scaling-devices", "20,40", "--set", "runtime.backend=local"]
    # a cache directory that cannot be made: the point's process fails while preparing its data
    payload = run(tmp_path, *argv, "--set", "data.cache_dir=/dev/null/cache")["scaling"]
    results = payload["results"]
    assert results["points"] == [] and results["exponents"] is None
    failed, skipped = results["not_measured"]
    assert failed["n_devices"] == 20 and failed["reason"].startswith("failed: ")
    assert skipped == {"n_devices": 40, "reason": "skipped: 20 devices failed"}


def test_broadcast(tmp_path: Path, ray_session) -> None:
    argv = ["--parts", "broadcast", "--broadcast-devices", "10", "--broadcast-actors", "1,2"]
    payload = run(tmp_path, *argv)["broadcast"]
    assert_recorded(payload, "broadcast")
    results = payload["results"]
    assert results["devices"] == 10 and results["model_and_patch_bytes"] > 0
    k = 16  # patch.k: each participant's starting meta-patch, float32, and its int64 id ride along
    for row in results["measurements"]:
        assert row["bytes_per_actor"] == results["model_and_patch_bytes"] + 10 * (8 + 4 * k)
        assert row["build_s"] > 0 and row["deliver_s"] > 0 and row["empty_call_s"] > 0
    assert [row["actors"] for row in results["measurements"]] == [1, 2]
