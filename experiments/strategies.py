"""The strategies side by side on MovieLens-100K: a per-round table of start / device / cloud GAUC, HR@10, NDCG@10.

Runs every chosen strategy × seed for R rounds with the in-process runtime (the same round loop as Ray) and writes
the rounds as JSON and a markdown table. Choose settings on the validation split (the default), report test:

    .venv/bin/python experiments/strategies.py                              # 5 strategies, seed 0, 3 rounds, valid
    .venv/bin/python experiments/strategies.py --split test --seeds 0,1,2 --out experiments/results/strategies_test
    .venv/bin/python experiments/strategies.py --strategies dccl --set cloud.beta=0.3 --out /tmp/beta03

Columns: `start` is the broadcast model W_t the devices started from, `device` the personalized device models
(MetaPatch / FedAvg / local fine-tuning; equal to start for cloud_only), `cloud` the cloud model after the round's
update W_{t+1}; `tail` is the least active quarter of users (activity bucket 0). Torch runs with one thread
(`--threads`): on a small shared machine more threads oversubscribe the CPU and slow everything down.
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

import torch
from cli_args import csv_list

from dccl_sim.config import STRATEGIES, ConfigError, load_config
from dccl_sim.runtime.session import run

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_STRATEGIES = ("cloud_only", "metapatch", "dccl", "fedavg", "local_finetune")
# (column, record field) pairs; the records' names are the run directory's public column names
FIELDS = (
    "start_gauc",
    "device_gauc",
    "cloud_gauc",
    "start_hr10",
    "device_hr10",
    "cloud_hr10",
    "start_ndcg10",
    "device_ndcg10",
    "cloud_ndcg10",
    "tail_start_gauc",
    "tail_device_gauc",
    "tail_cloud_gauc",
    "tail_device_hr10",
    "tail_cloud_hr10",
    "tail_device_ndcg10",
    "tail_cloud_ndcg10",
    "gate_pass_rate",
    "t_devices_s",
    "t_distill_s",
    "t_round_s",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--strategies",
        type=csv_list(str),
        default=list(DEFAULT_STRATEGIES),
        help=f"comma-separated strategies (default {','.join(DEFAULT_STRATEGIES)})",
    )
    parser.add_argument("--seeds", type=csv_list(int), default=[0], help="comma-separated seeds")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (default 3)")
    parser.add_argument("--split", choices=("valid", "test"), default="valid", help="evaluation split (default valid)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output path without suffix; writes OUT.json and OUT.md (default experiments/results/strategies_SPLIT)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown:
        parser.error(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be at least 1")
    if args.out is None:
        args.out = RESULTS / f"strategies_{args.split}"
    return args


def run_one(strategy: str, seed: int, args: argparse.Namespace, work_dir: Path) -> list[dict[str, Any]]:
    """One run's rounds as flat dicts of the FIELDS."""
    overrides = [
        "runtime.backend=local",
        f"metrics.split={args.split}",
        f"strategy={strategy}",
        f"seed={seed}",
        f"rounds={args.rounds}",
        f"output.out_dir={work_dir / f'{strategy}-{seed}'}",
        "output.progress=false",
        *args.overrides,
    ]
    state = run(load_config(None, overrides))
    return [{"round": r.round, **{name: float(getattr(r, name)) for name in FIELDS}} for r in state.records]


def mean_over_seeds(rows: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per round: the mean (and, with several seeds, the sample std) of every field over the seeds."""
    out = []
    for per_round in zip(*rows, strict=True):
        entry: dict[str, Any] = {"round": per_round[0]["round"], "n_seeds": len(per_round)}
        for name in FIELDS:
            values = [row[name] for row in per_round if not math.isnan(row[name])]
            entry[name] = sum(values) / len(values) if values else math.nan
            if len(values) > 1:
                mean = entry[name]
                entry[f"{name}_std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        out.append(entry)
    return out


def _fmt(value: float, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def markdown(results: dict[str, Any]) -> str:
    split, seeds = results["split"], results["seeds"]
    lines = [
        f"# Strategies on {results['source']} — {split} split",
        "",
        f"Seeds {', '.join(map(str, seeds))} (mean over seeds), {results['rounds']} rounds, "
        f"overrides: `{' '.join(results['overrides']) or '(none)'}`.",
        f"Command: `{results['command']}`",
        "",
        "`start`: the broadcast model W_t; `device`: the personalized device models; `Δ` = device − start; "
        "`cloud`: W_{t+1} after the round's update; `tail`: activity bucket 0 (the least active quarter).",
        "",
        "| strategy | round | GAUC start | GAUC device | Δ | GAUC cloud | HR@10 start | HR@10 device | HR@10 cloud "
        "| NDCG@10 start | NDCG@10 device | NDCG@10 cloud | tail GAUC start | tail GAUC device | tail Δ "
        "| tail GAUC cloud | gate pass | round s |",
        "|---|---|" + "---|" * 16,
    ]
    for strategy, rows in results["mean"].items():
        for r in rows:
            cells = [
                strategy,
                str(r["round"]),
                _fmt(r["start_gauc"]),
                _fmt(r["device_gauc"]),
                _fmt(r["device_gauc"] - r["start_gauc"], signed=True),
                _fmt(r["cloud_gauc"]),
                _fmt(r["start_hr10"]),
                _fmt(r["device_hr10"]),
                _fmt(r["cloud_hr10"]),
                _fmt(r["start_ndcg10"]),
                _fmt(r["device_ndcg10"]),
                _fmt(r["cloud_ndcg10"]),
                _fmt(r["tail_start_gauc"]),
                _fmt(r["tail_device_gauc"]),
                _fmt(r["tail_device_gauc"] - r["tail_start_gauc"], signed=True),
                _fmt(r["tail_cloud_gauc"]),
                "—" if math.isnan(r["gate_pass_rate"]) else f"{r['gate_pass_rate']:.2f}",
                f"{r['t_round_s']:.0f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if "cloud_only" in results["mean"]:
        base = results["mean"]["cloud_only"]
        lines += ["", "Cloud GAUC minus cloud_only's, per round:", ""]
        lines += ["| strategy | " + " | ".join(f"round {r['round']}" for r in base) + " |"]
        lines += ["|---|" + "---|" * len(base)]
        for strategy, rows in results["mean"].items():
            diffs = [_fmt(r["cloud_gauc"] - b["cloud_gauc"], signed=True) for r, b in zip(rows, base, strict=True)]
            lines.append(f"| {strategy} | " + " | ".join(diffs) + " |")
    lines += ["", f"Machine: {results['machine']}; torch threads {results['threads']}; {results['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="dccl-strategies-") as tmp:
        for strategy in args.strategies:
            for seed in args.seeds:
                tic = time.perf_counter()
                try:
                    rows = run_one(strategy, seed, args, Path(tmp))
                except ConfigError as error:
                    print(error, file=sys.stderr)
                    return 2
                runs.setdefault(strategy, []).append(rows)
                if not args.quiet:
                    first, last = rows[0], rows[-1]
                    print(
                        f"{strategy} seed {seed}: round-0 Δdevice {first['device_gauc'] - first['start_gauc']:+.4f}, "
                        f"final cloud GAUC {last['cloud_gauc']:.4f} ({time.perf_counter() - tic:.0f} s)",
                        flush=True,
                    )
    results = {
        "source": load_config(None, args.overrides).data.source,
        "command": " ".join(["python", "experiments/strategies.py", *(argv if argv is not None else sys.argv[1:])]),
        "split": args.split,
        "seeds": args.seeds,
        "rounds": args.rounds,
        "overrides": args.overrides,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
        "wall_s": time.perf_counter() - started,
        "runs": {
            s: [{"seed": seed, "rounds": rows} for seed, rows in zip(args.seeds, v, strict=True)]
            for s, v in runs.items()
        },
        "mean": {strategy: mean_over_seeds(rows) for strategy, rows in runs.items()},
    }
    json_path, md_path = Path(f"{args.out}.json"), Path(f"{args.out}.md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2))
    md_path.write_text(markdown(results))
    if not args.quiet:
        print(markdown(results))
        print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
