"""The harness's command line, `python -m bench` (what `make bench` runs); see NOTES.md for what each part means."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

from cli_args import csv_list

from bench import broadcast, ceiling, cloud_workers, device_phase, flower, scaling
from bench.common import RunInfo, overrides_for, run_part
from bench.table import PARTS, write_table

RESULTS = Path(__file__).resolve().parent / "results"
PROJECTED_WORKERS = (16, 64)  # the cloud-worker counts the cost model projects to (part cloud_workers)


@dataclass(frozen=True)
class Sizes:
    """The sizes a run uses where the command line does not set them."""

    repeats: int
    matmul_sizes: list[int]
    devices: list[int]
    actor_devices: int
    scaling_devices: list[int]
    broadcast_devices: int
    broadcast_actors: list[int]
    flower_devices: list[int]
    cloud_devices: int
    cloud_workers: list[int]
    out: Path
    work_dir: Path


FULL = Sizes(
    repeats=3,
    matmul_sizes=[1024, 2048],
    devices=[100, 1_000, 10_000],
    actor_devices=32,
    scaling_devices=[1_000, 10_000, 100_000, 1_000_000],
    broadcast_devices=10_000,
    broadcast_actors=[2, 8],
    flower_devices=[100, 1_000],
    cloud_devices=10_000,
    cloud_workers=[1, 2, 3],
    out=RESULTS,
    work_dir=Path("runs/bench"),
)
QUICK = Sizes(
    repeats=1,
    matmul_sizes=[256, 512],
    devices=[50, 200],
    actor_devices=4,
    scaling_devices=[200, 400, 800],
    broadcast_devices=200,
    broadcast_actors=[2, 4],
    flower_devices=[20, 50],
    cloud_devices=300,
    cloud_workers=[1, 2],
    out=Path("runs/bench-quick/results"),
    work_dir=Path("runs/bench-quick"),
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a couple of minutes")
    parser.add_argument(
        "--parts", type=csv_list(str), default=list(PARTS), help=f"which parts (default all: {','.join(PARTS)})"
    )
    parser.add_argument("--repeats", type=int, help="repeats per figure, the median reported (default 3)")
    parser.add_argument("--matmul-sizes", type=csv_list(int), help="ceiling: square sizes (default 1024,2048)")
    parser.add_argument("--devices", type=csv_list(int), help="device phase: device counts (default 100,1000,10000)")
    parser.add_argument("--actor-devices", type=int, help="device phase: count run one actor per device (default 32)")
    parser.add_argument(
        "--scaling-devices", type=csv_list(int), help="round latency: device counts (default 1000,...,1000000)"
    )
    parser.add_argument("--max-devices", type=int, help="round latency: leave out larger counts")
    parser.add_argument(
        "--large-repeats",
        type=int,
        default=1,
        help=f"round latency: repeats of counts of {scaling.LARGE:,}+ devices, tens of minutes each (default 1)",
    )
    parser.add_argument("--fit-from", type=int, default=10_000, help="fit the exponent over N >= this (10000)")
    parser.add_argument("--eval-devices", type=int, default=2000, help="metrics.eval_devices (default 2000)")
    parser.add_argument("--broadcast-devices", type=int, help="broadcast: participants (default 10000)")
    parser.add_argument("--broadcast-actors", type=csv_list(int), help="broadcast: actor counts (default 2,8)")
    parser.add_argument("--cloud-devices", type=int, help="cloud_workers: devices of the measured update (10000)")
    parser.add_argument("--cloud-workers", type=csv_list(int), help="cloud_workers: worker counts measured (1,2,3)")
    parser.add_argument("--flower-devices", type=csv_list(int), help="Flower side by side: clients (default 100,1000)")
    parser.add_argument(
        "--flower-client-cpus",
        type=float,
        default=flower.CLIENT_CPUS,
        help=f"Flower side by side: client_resources num_cpus (default {flower.CLIENT_CPUS:g}; Flower's own is 2)",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    parser.add_argument("--out", type=Path, help="result files (default experiments/bench/results)")
    parser.add_argument("--work-dir", type=Path, help="the round-latency runs' directories (default runs/bench)")
    args = parser.parse_args(argv)
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    sizes = QUICK if args.quick else FULL
    for field in fields(Sizes):
        if getattr(args, field.name) is None:
            setattr(args, field.name, getattr(sizes, field.name))
    return args


def measure(part: str, args: argparse.Namespace, overrides: list[str], flops: device_phase.Ceiling) -> dict[str, Any]:
    """One part's results; `flops` is this run's matmul ceiling (FLOP/s fractions are ratios within one run)."""
    match part:
        case "ceiling":
            return ceiling.measure(args.matmul_sizes, args.repeats)
        case "device_phase":
            return device_phase.measure(args.devices, args.actor_devices, overrides, args.repeats, flops)
        case "scaling":
            counts = [n for n in args.scaling_devices if args.max_devices is None or n <= args.max_devices]
            args.out.mkdir(parents=True, exist_ok=True)  # the plot is written before the part's JSON
            plot = args.out / "scaling_latency.png"
            work = args.work_dir / "scaling"
            return scaling.measure(counts, overrides, args.repeats, work, args.fit_from, plot, args.large_repeats)
        case "broadcast":
            return broadcast.measure(args.broadcast_devices, args.broadcast_actors, overrides, args.repeats)
        case "cloud_workers":
            work = args.work_dir / "cloud_workers"
            return cloud_workers.measure(
                args.cloud_devices, args.cloud_workers, PROJECTED_WORKERS, 1_000_000, overrides, args.repeats, work
            )
        case _:
            log = args.work_dir / "flower" / "flower_sim.log"
            return flower.measure(args.flower_devices, overrides, args.repeats, args.flower_client_cpus, log)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    info = RunInfo(command=shlex.join(["python", "-m", "bench", *argv]), quick=args.quick, repeats=args.repeats)
    overrides = overrides_for(args.eval_devices, args.overrides)
    flops = device_phase.Ceiling()
    for part in PARTS:
        if part not in args.parts:
            continue
        tic = time.perf_counter()
        payload = run_part(part, info, args.out, partial(measure, part, args, overrides, flops))
        if part == "ceiling":
            results = payload["results"]
            flops = device_phase.Ceiling(results["ceiling_flops_one_thread"], results["ceiling_flops_all_threads"])
        print(f"{part}: {time.perf_counter() - tic:.0f} s, wrote {args.out / part}.json", flush=True)
    print(f"wrote {write_table(args.out)}")
    return 0
