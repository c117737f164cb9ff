"""What the parts of the benchmark share: the simulation setting they measure, medians over repeats, and the record
of the command, the machine and its load that every result file carries."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import psutil
import ray
import torch

from dccl_sim.config import SimConfig, load_config
from dccl_sim.runtime.ray_runtime import RayRuntime

T = TypeVar("T")

# The setting: default model sizes, one local epoch, ~20 training samples per device in round 0 (the
# pretraining share plus window 0 of ~16 interactions: about 7 positives with 2 negatives each). Pretraining is
# set-up, not part of any timed phase, so one epoch of it (and of bootstrapping G) keeps the set-up short.
# Evaluation negatives are drawn on load: stored, 99 per positive, 10^6 devices would not fit in memory. The
# bootstrap's per-user θ table is updated lazily: a dense Adam step over 10^6 rows costs ~0.13 s, ~36 minutes an epoch.
BASE_OVERRIDES = (
    "data.source=synthetic",
    "strategy=dccl",
    "rounds=1",
    "device.local_epochs=1",
    "data.synthetic.mean_interactions=16",
    "cloud.pretrain_epochs=1",
    "patch.bootstrap_epochs=1",
    "data.eval_negatives_on_load=true",
    "patch.bootstrap_table=lazy",
    "output.progress=false",
)


def overrides_for(eval_devices: int, extra: Sequence[str]) -> list[str]:
    """The benchmark's settings: evaluation on a fixed sample of devices, so that it does not grow with N, then the
    user's `--set` overrides."""
    return [*BASE_OVERRIDES, f"metrics.eval_devices={eval_devices}", *extra]


def bench_config(devices: int, overrides: Sequence[str]) -> SimConfig:
    return load_config(None, [*overrides, f"data.num_devices={devices}"])


def pretrain_cache(config: SimConfig) -> str:
    """Where the round loop caches pretrained clouds; every part reuses the same ones."""
    return str(config.data.cache_dir.expanduser() / "pretrained")


def median_time(fn: Callable[[], T], repeats: int) -> tuple[float, list[float], T]:
    """Run `fn` `repeats` times: (median seconds, every time, the last value)."""
    times, value = [], None
    for _ in range(repeats):
        tic = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times), times, value


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def ray_started() -> Iterator[int]:
    """Ray for a whole part, yielding its CPU count: an embedded instance, or the one already running (a test
    session's). The runtimes a part creates inside find it running and leave it up when they shut down."""
    runtime = RayRuntime()
    try:
        yield runtime.num_cpus  # starts Ray unless it is running
    finally:
        runtime.shutdown()


def ratio(numerator: float, denominator: float | None) -> float | None:
    """numerator / denominator, or None where there is nothing to divide by (JSON has no NaN)."""
    return numerator / denominator if denominator else None


def machine() -> dict[str, Any]:
    return {
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": psutil.virtual_memory().total / 2**30,
        "cpu": _cpu_model(),
        "platform": platform.platform(),
    }


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "numpy": np.__version__,
        "dccl_sim_commit": _git_commit(),
    }


def _git_commit(here: Path = Path(__file__).parent) -> str:
    """The commit checked out at `here`, "-dirty" if tracked files differ from it, `here/results` aside (the parts
    of one `make bench` write them in turn, which would otherwise mark every part after the first)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(exclude)results")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if changed else commit


@dataclass(frozen=True)
class RunInfo:
    """How the harness was invoked; every result file repeats it."""

    command: str
    quick: bool
    repeats: int


def run_part(name: str, info: RunInfo, out: Path, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one part and write `out/NAME.json`: its results with the command, machine, versions and load average."""
    load_start = os.getloadavg()
    tic = time.perf_counter()
    results = measure()
    payload = {
        "part": name,
        **asdict(info),
        "machine": machine(),
        "versions": versions(),
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
        "wall_s": time.perf_counter() - tic,
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, allow_nan=False))
    return payload
