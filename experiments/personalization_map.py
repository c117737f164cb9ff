"""Where DCCL wins: personalization and MoMoDistill gains over the synthetic generator's personal deviation ×
user activity × cloud staleness, as tables and heat maps.

    .venv/bin/python experiments/personalization_map.py                 # deviations 0,1,2,3, seeds 0,1, 2000 devices
    .venv/bin/python experiments/personalization_map.py --deviations 0,3 --seeds 0 --devices 500 --out /tmp/map

For every deviation strength and seed it runs, in-process on the validation split:
- `metapatch` with a frozen cloud (`cloud.finetune_epochs=0`): in round t the broadcast model has not learned the
  t + 1 windows the devices hold, so the cloud is t + 1 windows stale. The personalization gain is GAUC(device
  models) − GAUC(broadcast model), per activity bucket, pooled from devices.parquet's `device_auc` and
  `broadcast_auc`: the broadcast model is the plain W_t (θ̂ = 0, no starting patch), the honest baseline. (For
  metapatch it is also the model the devices start from, `start_auc`, which files written before `broadcast_auc`
  existed used: the same numbers. dccl's start adds the cloud's starting meta-patch θ̃ and can be worse than W_t.);
- `cloud_only` and `dccl` with the default cloud update (always one window stale, the DESIGN.md protocol): the
  MoMoDistill gain is GAUC(dccl's cloud) − GAUC(cloud_only's cloud) after the last round, per activity bucket.

The generator runs in the regime where a device can know more than the model's input: users have 50
interactions on average and the model sees only the last 5 (`REGIME`). With the defaults (about 20 interactions,
history 20) a user's whole past fits in the model's input and no deviation strength makes personalization pay
(experiments/results/strategies_investigation.md §5).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from cli_args import csv_list, source_commit

from dccl_sim import ConfigError, load_config, load_run, run

# Not in the public API: the per-activity-bucket GAUC pooled from devices.parquet's per-device AUCs exactly as the
# round records pool them, and its column labels (dccl_sim.report's, so the tables match `dccl-sim report`).
from dccl_sim.report import bucket_column_labels, bucket_gauc

RESULTS = Path(__file__).resolve().parent / "results"
REGIME = ("data.source=synthetic", "data.history_len=5", "data.synthetic.mean_interactions=50")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deviations", type=csv_list(float), default=[0.0, 1.0, 2.0, 3.0])
    parser.add_argument("--seeds", type=csv_list(int), default=[0, 1])
    parser.add_argument("--devices", type=int, default=2000, help="synthetic devices (default 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, i.e. staleness levels 1..R (default 3)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "personalization_map", help="OUT.json/.md/.png")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.rounds < 1 or args.threads < 1:
        parser.error("--devices, --rounds and --threads must be at least 1")
    if any(d < 0 for d in args.deviations):
        parser.error("--deviations must be non-negative")
    return args


def run_devices(overrides: list[str], work_dir: Path, name: str) -> dict[str, np.ndarray]:
    config = load_config(None, [*overrides, f"output.out_dir={work_dir / name}", "output.progress=false"])
    run(config)
    devices = load_run(work_dir / name, table_format="arrow").devices
    return {column: devices[column].to_numpy() for column in devices.column_names}


def cell_overrides(deviation: float, seed: int, args: argparse.Namespace) -> list[str]:
    """The settings every run of one (deviation, seed) cell shares; each run adds its strategy."""
    return [
        *REGIME,
        f"data.num_devices={args.devices}",
        f"data.synthetic.personal_deviation={deviation}",
        "runtime.backend=local",
        "metrics.split=valid",
        f"seed={seed}",
        f"rounds={args.rounds}",
        *args.overrides,
    ]


def personalization_gains(common: list[str], rounds: int, work_dir: Path, n_buckets: int) -> list[np.ndarray]:
    """Device − broadcast GAUC per bucket (+ all) in each round of `metapatch` with a frozen cloud."""
    frozen = run_devices([*common, "strategy=metapatch", "cloud.finetune_epochs=0"], work_dir, "frozen")
    return [
        np.array(bucket_gauc(frozen, r, "device_auc", n_buckets)) - bucket_gauc(frozen, r, "broadcast_auc", n_buckets)
        for r in range(rounds)
    ]


def measure(deviation: float, seed: int, args: argparse.Namespace, work_dir: Path, n_buckets: int) -> dict:
    """One (deviation, seed): personalization gain [staleness][bucket + all] and MoMoDistill gain [bucket + all]."""
    common = cell_overrides(deviation, seed, args)
    personal = personalization_gains(common, args.rounds, work_dir, n_buckets)
    last = args.rounds - 1
    clouds = {s: run_devices([*common, f"strategy={s}"], work_dir, s) for s in ("cloud_only", "dccl")}
    distill = np.array(bucket_gauc(clouds["dccl"], last, "cloud_auc", n_buckets)) - bucket_gauc(
        clouds["cloud_only"], last, "cloud_auc", n_buckets
    )
    return {
        "personalization_gain": [p.tolist() for p in personal],
        "momodistill_gain": distill.tolist(),
    }


def mean_std(values: list[list[float]]) -> tuple[list[float], list[float]]:
    array = np.array(values, dtype=np.float64)
    std = array.std(axis=0, ddof=1) if len(array) > 1 else np.zeros(array.shape[1:])
    return np.nanmean(array, axis=0).tolist(), std.tolist()


def summarize(cells: dict[float, list[dict]], rounds: int) -> dict[str, Any]:
    """Mean and std over seeds, keyed like the cells: deviation → quantity (→ staleness) → [bucket + all]."""
    out: dict[str, Any] = {}
    for deviation, per_seed in cells.items():
        entry: dict[str, Any] = {"personalization_gain": {}, "personalization_gain_std": {}}
        for r in range(rounds):
            mean, std = mean_std([seed["personalization_gain"][r] for seed in per_seed])
            entry["personalization_gain"][r + 1], entry["personalization_gain_std"][r + 1] = mean, std
        entry["momodistill_gain"], entry["momodistill_gain_std"] = mean_std([s["momodistill_gain"] for s in per_seed])
        out[str(deviation)] = entry
    return out


def _heat(ax, grid: np.ndarray, rows: list[str] | None, cols: list[str], title: str, limit: float) -> None:
    image = ax.imshow(grid * 1000, cmap="RdBu", vmin=-limit * 1000, vmax=limit * 1000, aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        dark = abs(value) > 0.6 * limit
        ax.text(j, i, f"{value * 1000:+.1f}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
    # slanted and anchored at their right end, the bucket labels stay clear of their neighbours
    ax.set_xticks(range(len(cols)), cols, fontsize=7, rotation=30, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(len(grid)), rows if rows is not None else [])  # row labels on the first panel only
    ax.set_title(title, fontsize=9)
    ax.axvline(len(cols) - 1.5, color="black", lw=0.8)
    return image


def plot(summary: dict[str, Any], quantiles: list[float], rounds: int, path: Path) -> None:
    deviations = list(summary)
    rows = [f"deviation {float(d):g}" for d in deviations]
    cols = bucket_column_labels(quantiles)
    panels = [
        (
            np.array([summary[d]["personalization_gain"][s] for d in deviations]),
            f"personalization gain, cloud {s} window{'s' if s > 1 else ''} stale",
        )
        for s in range(1, rounds + 1)
    ]
    panels.append(
        (np.array([summary[d]["momodistill_gain"] for d in deviations]), f"MoMoDistill gain after round {rounds - 1}")
    )
    limit = max(float(np.nanmax(np.abs(grid))) for grid, _ in panels) or 1e-3
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), constrained_layout=True)
    for index, (ax, (grid, title)) in enumerate(zip(np.atleast_1d(axes), panels, strict=True)):
        image = _heat(ax, grid, rows if index == 0 else None, cols, title, limit)
    fig.colorbar(image, ax=axes, label="GAUC gain × 1000 (red = loss)", shrink=0.8)
    fig.suptitle("Synthetic data: GAUC gain by personal deviation (rows) × user activity quantile (columns)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cell(mean: float, std: float) -> str:
    return "—" if math.isnan(mean) else f"{mean:+.4f} ± {std:.4f}"


def markdown(results: dict[str, Any]) -> str:
    cols = bucket_column_labels(results["bucket_quantiles"])
    header = ["| deviation | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines = [
        "# Where DCCL wins: gains over personal deviation × user activity × cloud staleness (synthetic, valid)",
        "",
        f"{results['devices']} devices, seeds {', '.join(map(str, results['seeds']))} (mean ± std), regime "
        f"`{' '.join(results['regime'])}`, overrides `{' '.join(results['overrides']) or '(none)'}`.",
        f"Command: `{results['command']}`",
        "",
        "Columns: users' activity quantile (training interactions; the first is the long tail) and all users. "
        "The broadcast model is the plain W_t the devices received (θ̂ = 0, no starting patch): the personalization "
        "gain is what the device models add over simply using it.",
    ]
    for s in range(1, results["rounds"] + 1):
        lines += ["", f"Personalization gain (device − broadcast GAUC), cloud {s} window(s) stale:", "", *header]
        for d, entry in results["summary"].items():
            means, stds = entry["personalization_gain"][s], entry["personalization_gain_std"][s]
            lines.append(f"| {float(d):g} | " + " | ".join(map(_cell, means, stds)) + " |")
    last = results["rounds"] - 1
    lines += ["", f"MoMoDistill gain (dccl cloud − cloud_only cloud GAUC) after round {last}:", "", *header]
    for d, entry in results["summary"].items():
        means, stds = entry["momodistill_gain"], entry["momodistill_gain_std"]
        lines.append(f"| {float(d):g} | " + " | ".join(map(_cell, means, stds)) + " |")
    lines += ["", f"![heat map]({results['plot']})", "", f"Machine: {results['machine']}; {results['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        quantiles = list(load_config(None, [*REGIME, *args.overrides]).metrics.bucket_quantiles)
    except ConfigError as error:
        sys.exit(str(error))
    cells: dict[float, list[dict]] = {}
    for deviation in args.deviations:
        for seed in args.seeds:
            tic = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="dccl-map-") as tmp:
                cell = measure(deviation, seed, args, Path(tmp), len(quantiles) + 1)
            cells.setdefault(deviation, []).append(cell)
            print(
                f"deviation {deviation:g} seed {seed}: personalization (1 window stale) "
                f"{cell['personalization_gain'][0][-1]:+.4f}, MoMoDistill {cell['momodistill_gain'][-1]:+.4f} "
                f"({time.perf_counter() - tic:.0f} s)",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = summarize(cells, args.rounds)
    plot(summary, quantiles, args.rounds, out.with_suffix(".png"))
    results = {
        "command": " ".join(
            ["python", "experiments/personalization_map.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "devices": args.devices,
        "seeds": args.seeds,
        "rounds": args.rounds,
        "regime": list(REGIME),
        **source_commit(),
        # the resolved config every cell shares; each sets its strategy, seed, deviation and staleness on top
        "base_config": load_config(None, [*REGIME, f"data.num_devices={args.devices}", *args.overrides]).model_dump(
            mode="json"
        ),
        "overrides": args.overrides,
        "bucket_quantiles": quantiles,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
        "wall_s": time.perf_counter() - started,
        "plot": out.with_suffix(".png").name,
        "cells": {str(d): per_seed for d, per_seed in cells.items()},
        "summary": summary,
    }
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {out}.json, {out}.md and {out}.png")
    return results


if __name__ == "__main__":
    main()
