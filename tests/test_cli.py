"""The command line as a user runs it: clear errors with exit code 2, the data command's summary."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dccl_sim.cli import main
from dccl_sim.data.store import read_meta


def test_bad_settings_exit_2_with_the_key_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--set", "device.local_epoch=2"]) == 2
    assert "device.local_epoch: unknown key" in capsys.readouterr().out
    assert main(["run", "--set", "rounds=0"]) == 2
    assert "rounds: Input should be greater than 0" in capsys.readouterr().out


def test_missing_config_file_and_unreachable_address(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "config file not found" in capsys.readouterr().out
    code = main(["run", "--address", "127.0.0.1:1", "--set", "data.num_devices=5", "--out", str(tmp_path / "r")])
    assert code == 2
    assert "cannot reach a Ray cluster" in capsys.readouterr().out


def test_resume_of_a_folder_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().out


def test_data_command_writes_a_dataset_and_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "syn"
    code = main(["data", "synthetic", "--devices", "200", "--out", str(out), "--set", "data.synthetic.num_items=300"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "devices" in printed and "200" in printed and "interactions per device" in printed
    assert read_meta(str(out)).num_devices == 200
    assert main(["data", "movielens", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "data.path: no such file or folder" in capsys.readouterr().out


CTRL_C_RUN = ["data.num_devices=8", "data.eval_negatives=9", "cloud.pretrain_epochs=1", "patch.bootstrap_epochs=1"]


def _interrupted_run(out: Path, settings: list[str], wait_s: float = 0.0, env: dict | None = None) -> tuple:
    """`dccl-sim run` in a subprocess, sent SIGINT `wait_s` after round 0 is on disk: (exit code, output, seconds
    from the signal to the exit)."""
    command = [sys.executable, "-m", "dccl_sim.cli", "run", "--out", str(out)]
    for setting in [*CTRL_C_RUN, "output.progress=false", *settings]:
        command += ["--set", setting]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 300
    while not (out / "rounds.parquet").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(wait_s)
    signalled = time.monotonic()
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    return process.returncode, output, time.monotonic() - signalled


def test_ctrl_c_keeps_finished_rounds_and_resume_finishes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, output, _ = _interrupted_run(out, ["rounds=4", "runtime.backend=local"])
    finished = pq.read_table(out / "rounds.parquet").num_rows
    assert 1 <= finished <= 4
    if finished < 4:  # interrupted mid-run: a clear message and exit code 130
        assert code == 130, output
        assert "continue with" in output and "--resume" in output
    assert main(["run", "--resume", str(out), "--set", "output.progress=false"]) == 0
    assert pq.read_table(out / "rounds.parquet")["round"].to_pylist() == [0, 1, 2, 3]


SLOW_DEVICES = """
import time

from dccl_sim.strategies.cloud_only import CloudOnly


class SlowDevices(CloudOnly):
    name = "slow_devices"

    def device_step(self, device, ctx, broadcast, device_ids):
        if ctx.round >= 1:
            time.sleep(120)  # a device phase of minutes, as at 10^6 devices
        return super().device_step(device, ctx, broadcast, device_ids)
"""


def test_ctrl_c_reaches_a_driver_waiting_for_the_devices_on_ray(tmp_path: Path) -> None:
    """On Ray the driver spends a round waiting for the packs: Ctrl-C must stop it there within seconds, not when
    the packs answer. Round 1's device step sleeps two minutes; the signal comes 2 s after round 0 is on disk, when
    round 1's broadcast is out and the driver waits for the sleeping packs."""
    (tmp_path / "slow_devices.py").write_text(SLOW_DEVICES)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    code, output, seconds = _interrupted_run(out, ["rounds=2", "strategy=slow_devices:SlowDevices"], 2.0, env)
    assert code == 130, output
    assert seconds < 30, "Ctrl-C waited for the device phase"
    assert "--resume" in output and pq.read_table(out / "rounds.parquet").num_rows == 1
    # Ray's own lines (its start-up notice, the token-authentication warning) are not shown without --verbose
    assert "Started a local Ray instance" not in output and "Token authentication" not in output, output


def test_verbose_shows_rays_own_log_lines(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "dccl_sim.cli", "run", "--verbose", "--out", str(tmp_path / "run")]
    for setting in [*CTRL_C_RUN, "output.progress=false", "rounds=1"]:
        command += ["--set", setting]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Started a local Ray instance" in result.stdout + result.stderr
    assert '"verbose": true' in (tmp_path / "run" / "config.json").read_text()


def test_data_command_writes_to_a_filesystem_uri(tmp_path: Path) -> None:
    from dccl_sim.data.store import read_devices

    uri = f"file://{tmp_path}/uri-dataset"
    assert main(["data", "synthetic", "--devices", "30", "--out", uri, "--set", "data.synthetic.num_items=100"]) == 0
    assert read_meta(uri).num_devices == 30
    assert read_devices(uri, [3, 4]).num_devices == 2


def test_cache_command_shows_and_clears_parts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    for part, name in (("datasets", "ml100k-abc/meta.json"), ("pretrained", "0123.pt")):
        (cache / part / name).parent.mkdir(parents=True, exist_ok=True)
        (cache / part / name).write_bytes(b"x" * 2**20)
    where = ["--set", f"data.cache_dir={cache}"]
    assert main(["cache", *where]) == 0
    shown = capsys.readouterr().out
    assert "datasets" in shown and "1.0" in shown
    assert main(["cache", "--clear", "pretrained", *where]) == 0
    assert "cleared" in capsys.readouterr().out
    assert not (cache / "pretrained").exists() and (cache / "datasets" / "ml100k-abc" / "meta.json").exists()
    assert main(["cache", "--clear", "everything", *where]) == 2
    assert "unknown part 'everything'" in capsys.readouterr().out
