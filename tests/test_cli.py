"""The command line as a user runs it: clear errors with exit code 2, the data command's summary."""

from __future__ import annotations

from pathlib import Path

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
    assert "no such dataset directory or MovieLens file" in capsys.readouterr().out
