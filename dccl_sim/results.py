"""Reading a finished (or stopped) run back: its config and its rounds and devices tables."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq


class RunDirectoryError(ValueError):
    """A folder that does not hold a run (or not yet a finished round), or a run file that is damaged; the message
    says which and what is wrong."""


def read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    """A run's Parquet file, or RunDirectoryError naming it when it cannot be read (truncated, not Parquet) or
    lacks one of `columns`."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RunDirectoryError(f"{path}: damaged, not a readable Parquet file ({reason})") from None
    missing = sorted(set(columns or ()) - set(table.column_names))
    if missing:
        raise RunDirectoryError(f"{path}: damaged, it lacks the column {missing[0]!r}")
    return table


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's saved config.json as a dict, or RunDirectoryError naming it when it is damaged."""
    path = run_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunDirectoryError(f"{path}: damaged, not JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise RunDirectoryError(f"{path}: damaged, not a config (a JSON {type(config).__name__})")
    return config


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
    rounds = read_table(run_dir / "rounds.parquet", ["round"]).sort_by("round")
    devices_file = run_dir / "devices.parquet"
    devices = read_table(devices_file) if devices_file.is_file() else None
    if as_pandas:
        rounds, devices = rounds.to_pandas(), None if devices is None else devices.to_pandas()
    return RunResults(read_config(run_dir), rounds, devices)


def check_run_dir(run_dir: Path) -> None:
    """Raise RunDirectoryError unless `run_dir` holds a config and at least one finished round."""
    if not run_dir.is_dir():
        raise RunDirectoryError(f"{run_dir}: no such folder")
    if not (run_dir / "config.json").is_file():
        raise RunDirectoryError(f"{run_dir}: not a run directory (no config.json; make one with `dccl-sim run`)")
    if not (run_dir / "rounds.parquet").is_file():
        raise RunDirectoryError(f"{run_dir}: no finished round yet (no rounds.parquet)")
    if read_table(run_dir / "rounds.parquet").num_rows == 0:
        raise RunDirectoryError(f"{run_dir}: rounds.parquet holds no rounds")
