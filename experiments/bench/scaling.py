"""Part 3, round latency and peak memory against device count: one `dccl` round per point through the sweep
machinery (`dccl_sim.sweep`: each point a fresh process, its phases from `rounds.parquet`, its peak memory the PSS
of the process and everything it started), with the scaling exponent a of t ∝ N^a.

Each repeat runs every device count, smallest first; counts of `LARGE` devices or more run `large_repeats` times.
A point that fails (its process killed for memory, say) is recorded with the error, and the larger counts are
skipped with the reason: they would need more.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from dccl_sim.sweep import PHASES, build_grid, plot_latency, run_sweep

# the sweep row's figures reported per device count (medians over repeats)
FIGURES = (
    *(f"mean_{phase}" for phase in PHASES),
    "mean_sim_round_s",
    "mean_participants",  # below n_devices where a pack's actor died (killed for memory, say)
    "devices_per_s",
    "samples_per_s",
    "max_round_memory_mb",
    "setup_s",  # time to the first round: data, actors, pretraining
    "peak_memory_mb",
    "wall_s",
)


def scaling_exponent(devices: Sequence[float], values: Sequence[float]) -> float:
    """a of the least-squares line log(value) = a · log(devices) + c."""
    slope, _ = np.polyfit(np.log(np.asarray(devices, dtype=float)), np.log(np.asarray(values, dtype=float)), 1)
    return float(slope)


def fit(rows: list[dict[str, Any]], fit_from: int) -> dict[str, Any]:
    """Exponents over the points with at least `fit_from` devices, or over every point where fewer than two have."""
    used = [row for row in rows if row["n_devices"] >= fit_from]
    if len(used) < 2:
        used = rows
    if len(used) < 2:
        return {"fit_devices": [row["n_devices"] for row in used], "exponents": None}
    devices = [row["n_devices"] for row in used]
    figures = {"t_round_s": "mean_t_round_s", "t_devices_s": "mean_t_devices_s", "memory": "max_round_memory_mb"}
    return {
        "fit_devices": devices,
        "exponents": {name: scaling_exponent(devices, [row[key] for row in used]) for name, key in figures.items()},
    }


# from this many devices a point takes tens of minutes: it runs `large_repeats` times instead of `repeats`
LARGE = 1_000_000


def measure(
    counts: Sequence[int],
    overrides: Sequence[str],
    repeats: int,
    work_dir: Path,
    fit_from: int,
    plot: Path,
    large_repeats: int = 1,
) -> dict[str, Any]:
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
    failed: dict[int, str] = {}
    for repeat in range(max(repeats, large_repeats)):
        todo = [n for n in counts if n not in failed and repeat < (large_repeats if n >= LARGE else repeats)]
        if not todo:
            break
        out = work_dir / f"repeat-{repeat}"
        points = build_grid([str(n) for n in todo], list(overrides), out_dir=out)
        done: list[dict[str, Any]] = []
        try:
            run_sweep(points, out, isolate=True, on_row=done.append)
        except Exception as error:  # a point's process dying (out of memory, say) takes the sweep down: record, go on
            broken = todo[len(done)]
            failed[broken] = f"failed: {type(error).__name__}: {error}"
            for larger in todo[len(done) + 1 :]:
                failed[larger] = f"skipped: {broken:,} devices failed"
        for row in done:
            runs[row["n_devices"]].append(row)
    rows = [_median_row(n, runs[n]) for n in counts if runs[n]]
    if rows:
        plot_latency(rows, ["data.num_devices"], plot)
    return {
        "setting": list(overrides),
        "ram_gib": psutil.virtual_memory().total / 2**30,
        "points": rows,
        "not_measured": [{"n_devices": n, "reason": reason} for n, reason in failed.items() if not runs[n]],
        **fit(rows, fit_from),
        "fit_from": fit_from,
        "plot": plot.name if rows else None,
    }


def _median_row(devices: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"n_devices": devices, "strategy": rows[0]["strategy"], "repeats": len(rows)}
    for key in FIGURES:
        value = statistics.median(r[key] for r in rows)
        row[key] = value if math.isfinite(value) else None  # JSON has no NaN
    row["t_round_s_all"] = [r["mean_t_round_s"] for r in rows]
    row["run_dirs"] = [r["run_dir"] for r in rows]
    return row
