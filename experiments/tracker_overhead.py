"""What an experiment tracker (`output.tracker`) adds to a run: the seconds each of its hooks takes, once at the
start (importing the package, opening the store: `make_tracker`; creating the tracked run: `on_start`), per round
(`on_round`) and at the end (`on_end`, MLflow's artifacts), on a small real run.

    .venv/bin/python experiments/tracker_overhead.py                         # mlflow, 50 ML-100K devices, 5 rounds
    .venv/bin/python experiments/tracker_overhead.py --tracker tensorboard

The run itself has `output.tracker = none`; the tracker `make_tracker` builds for the same settings is passed to
`dccl_sim.run` as an observer that times each hook, so it runs where a tracked run's would (after the run
directory's observer). MLflow logs into a new SQLite store in the work folder (its working directory then, where
MLflow puts artifacts), not into `MLFLOW_TRACKING_URI`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from cli_args import source_commit

import dccl_sim
from dccl_sim.config import ConfigError, load_config
from dccl_sim.runtime.trackers import make_tracker

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULTS = ["data.num_devices=50", "rounds=5", "runtime.backend=local", "output.progress=false"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracker", choices=["mlflow", "tensorboard"], default="mlflow")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    parser.add_argument("--work-dir", type=Path, help="where the run and the MLflow store go (default: a temp folder)")
    parser.add_argument("--out", type=Path, help="the JSON results (default: results/tracker_overhead_TRACKER.json)")
    return parser.parse_args(argv)


class TimedTracker(dccl_sim.Observer):
    """Calls each hook of `tracker`, recording its seconds."""

    def __init__(self, tracker: dccl_sim.Observer) -> None:
        self.tracker = tracker
        self.seconds: dict[str, list[float]] = defaultdict(list)

    def _timed(self, hook: str, *args: Any) -> None:
        tic = time.perf_counter()
        getattr(self.tracker, hook)(*args)
        self.seconds[hook].append(time.perf_counter() - tic)

    def on_start(self, *args: Any) -> None:
        self._timed("on_start", *args)

    def on_round(self, *args: Any) -> None:
        self._timed("on_round", *args)

    def on_end(self, *args: Any) -> None:
        self._timed("on_end", *args)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="tracker-overhead-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    out_dir = work / f"run-{args.tracker}"
    overrides = [*DEFAULTS, *args.overrides, f"output.out_dir={out_dir}", "output.overwrite=true"]
    try:
        config = load_config(None, overrides)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    args.out = (args.out or RESULTS / f"tracker_overhead_{args.tracker}.json").resolve()
    os.chdir(work)
    tic = time.perf_counter()
    tracker = make_tracker(
        config.model_copy(update={"output": config.output.model_copy(update={"tracker": args.tracker})})
    )
    setup_s = time.perf_counter() - tic
    timed = TimedTracker(tracker)
    results = dccl_sim.run(config, observers=[timed])
    per_round = timed.seconds["on_round"]
    round_s = [float(s) for s in results.rounds["t_round_s"]]
    result = {
        "tracker": args.tracker,
        "overrides": overrides,
        **source_commit(),
        "make_tracker_s": setup_s,
        "on_start_s": timed.seconds["on_start"][0],
        "on_round_s": per_round,
        "on_round_median_s": statistics.median(per_round),
        "on_end_s": timed.seconds["on_end"][0],
        "t_round_s": round_s,
        "load_average": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{args.tracker}: {result['on_round_median_s']:.3f} s per round (median; {min(per_round):.3f} to "
        f"{max(per_round):.3f}) against rounds of {min(round_s):.1f} to {max(round_s):.1f} s; "
        f"{setup_s:.1f} s to import and open the store, {result['on_start_s']:.3f} s to start the tracked run, "
        f"{result['on_end_s']:.3f} s at the end; wrote {args.out}"
    )
    return result


if __name__ == "__main__":
    main()
