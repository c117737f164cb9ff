"""Reading a finished (or stopped) run back: its config and its rounds and devices tables."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq


class RunDirectoryError(ValueError):
    """A folder that does not hold a run (or not yet a finished round); the message says what is missing."""


@dataclass(frozen=True)
class RunResults:
    """A run directory's contents: the resolved config (as saved, a dict), one row per round and one row per
    sampled device per round (column meanings: README, "Outputs"). Tables are pandas DataFrames when pandas is
    installed, else pyarrow Tables; `devices` is None when the run wrote no device rows."""

    config: dict[str, Any]
    rounds: Any
    devices: Any


def load_run(run_dir: str | Path, table_format: Literal["auto", "pandas", "arrow"] = "auto") -> RunResults:
    """The run in `run_dir`. `table_format`: "auto" gives DataFrames if pandas is installed, else Arrow tables."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    as_pandas = table_format == "pandas" or (table_format == "auto" and importlib.util.find_spec("pandas"))
    if table_format == "pandas" and not importlib.util.find_spec("pandas"):
        raise ImportError("table_format='pandas' needs pandas: pip install pandas")
    rounds = pq.read_table(run_dir / "rounds.parquet").sort_by("round")
    devices_file = run_dir / "devices.parquet"
    devices = pq.read_table(devices_file) if devices_file.is_file() else None
    if as_pandas:
        rounds, devices = rounds.to_pandas(), None if devices is None else devices.to_pandas()
    return RunResults(json.loads((run_dir / "config.json").read_text()), rounds, devices)


def check_run_dir(run_dir: Path) -> None:
    """Raise RunDirectoryError unless `run_dir` holds a config and at least one finished round."""
    if not run_dir.is_dir():
        raise RunDirectoryError(f"{run_dir}: no such folder")
    if not (run_dir / "config.json").is_file():
        raise RunDirectoryError(f"{run_dir}: not a run directory (no config.json; make one with `dccl-sim run`)")
    if not (run_dir / "rounds.parquet").is_file():
        raise RunDirectoryError(f"{run_dir}: no finished round yet (no rounds.parquet)")
    if pq.read_metadata(run_dir / "rounds.parquet").num_rows == 0:
        raise RunDirectoryError(f"{run_dir}: rounds.parquet holds no rounds")
