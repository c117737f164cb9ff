"""The strategies side by side on MovieLens-100K: a per-round table of broadcast / start / device / cloud GAUC,
HR@10, NDCG@10 and MRR.

Runs every chosen strategy × seed for R rounds with the in-process runtime (the same round loop as Ray) and writes
the rounds as JSON, markdown tables (mean ± std over seeds; per activity bucket) and two plots (OUT_rounds.png:
metrics per round; OUT_buckets.png: personalization gain device − broadcast by user activity). Choose settings on the
validation split (the default), report test:

    .venv/bin/python experiments/strategies.py                              # 5 strategies, seed 0, 3 rounds, valid
    .venv/bin/python experiments/strategies.py --split test --seeds 0,1,2 --out experiments/results/strategies_test
    .venv/bin/python experiments/strategies.py --strategies dccl --set cloud.beta=0.3 --out /tmp/beta03

Columns: `broadcast` is the plain broadcast model W_t (θ̂ = 0, no starting patch), the honest baseline: the headline
personalization gain Δ = device − broadcast is what a device gains over simply using the cloud's model. `start` is
the model a device starts from (W_t, plus for dccl the cloud's starting meta-patch θ̃, which can be worse than W_t);
device − start, the second figure, is what the on-device step adds to that starting point. `device` is the
personalized device models (MetaPatch / FedAvg / local fine-tuning; equal to start for cloud_only), `cloud` the cloud
model after the round's update W_{t+1}; `tail` is the least active quarter of users (activity bucket 0).

JSON per round (in `runs` per seed, in `mean` with `_std` over seeds): every rounds.parquet column in FIELDS and the
ranking columns `[tail_]<model>_hr@K / _ndcg@K / _mrr`; `device_gain_vs_broadcast`, `tail_device_gain_vs_broadcast`,
`bucket_device_gain_vs_broadcast` (the headline); `device_gain`, `tail_device_gain`, `bucket_device_gain` (device −
start, their meaning in older files); `bucket_<model>_gauc` per activity bucket then all; `cloud_gain` and
`bucket_cloud_gain` (paired with cloud_only). Torch runs with one thread (`--threads`): on a small shared machine more
threads oversubscribe the CPU and slow everything down.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import platform
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
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
SAME_CLOUD_AS_CLOUD_ONLY = ("metapatch", "local_finetune", "coda")
DEFAULT_STRATEGIES = ("cloud_only", "metapatch", "dccl", "fedavg", "local_finetune")
# rounds.parquet columns kept per round (the run directory's public column names); the *_hr10 / *_ndcg10 aliases stay
# so that the JSON keeps every field of older files
FIELDS = (
    "broadcast_gauc",
    "tail_broadcast_gauc",
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
    "candidates_per_device",
    "kept_per_device",
    "candidate_bytes_per_device",
    "device_compute_p50_s",
    "t_devices_s",
    "t_distill_s",
    "t_round_s",
)
# CoDA's own round columns: only CoDA runs record them; the other strategies have no candidates (0)
ABSENT_AS_ZERO = ("candidates_per_device", "kept_per_device", "candidate_bytes_per_device")
# the ranking columns at every cut-off of metrics.ks, kept too: e.g. device_hr@10, tail_cloud_ndcg@5, broadcast_mrr
RANKING_COLUMN = re.compile(r"(tail_)?(broadcast|start|device|cloud)_(full_)?(hr@\d+|ndcg@\d+|mrr)")
# what the tables and plots show (NaN when a run's metrics.ks leaves out 10)
SHOWN_RANKING = tuple(
    f"{tail}{model}_{metric}"
    for tail in ("", "tail_")
    for model in ("broadcast", "start", "device", "cloud")
    for metric in ("hr@10", "ndcg@10", "mrr", "full_hr@10", "full_ndcg@10", "full_mrr")
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
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (default 1)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the runs already finished under OUT_runs/ by the same commit and settings (each finished run "
        "is kept there as it completes)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    for strategy in args.strategies:
        try:  # validation names the known strategies (and accepts a plug-in's module:Attribute)
            load_config(None, [f"strategy={strategy}"])
        except ConfigError as error:
            parser.error(str(error))
    if args.rounds < 1 or args.threads < 1 or args.jobs < 1:
        parser.error("--rounds, --threads and --jobs must be at least 1")
    if args.out is None:
        args.out = RESULTS / f"strategies_{args.split}"
    return args


def numpy_columns(table: Any) -> dict[str, np.ndarray]:
    """An Arrow table (what `load_run(..., table_format="arrow")` gives) as NumPy columns."""
    return {name: table[name].to_numpy() for name in table.column_names}


def run_one(strategy: str, seed: int, args: argparse.Namespace, work_dir: Path) -> list[dict[str, Any]]:
    """One run's rounds as flat dicts: the FIELDS, the ranking columns, the gains (device − broadcast, the headline,
    and device − start) and per-bucket GAUCs (lists: buckets, then all)."""
    out_dir = work_dir / f"{strategy}-{seed}"
    overrides = [
        "runtime.backend=local",
        f"metrics.split={args.split}",
        f"strategy={strategy}",
        f"seed={seed}",
        f"rounds={args.rounds}",
        f"output.out_dir={out_dir}",
        "output.progress=false",
        *args.overrides,
    ]
    config = load_config(None, overrides)
    run(config)
    results = load_run(out_dir, table_format="arrow")
    rounds, devices = numpy_columns(results.rounds), numpy_columns(results.devices)
    n_buckets = len(config.metrics.bucket_quantiles) + 1
    ranking = [name for name in rounds if RANKING_COLUMN.fullmatch(name)]
    names = [*FIELDS, *ranking, *(name for name in SHOWN_RANKING if name not in ranking)]
    rows = []
    for i, round_index in enumerate(rounds["round"].tolist()):
        row: dict[str, Any] = {"round": round_index}
        for name in names:
            absent = 0.0 if name in ABSENT_AS_ZERO else math.nan
            row[name] = float(rounds[name][i]) if name in rounds else absent
        # the headline: against the plain broadcast model; the second figure: against the device's starting model
        row["device_gain_vs_broadcast"] = row["device_gauc"] - row["broadcast_gauc"]
        row["tail_device_gain_vs_broadcast"] = row["tail_device_gauc"] - row["tail_broadcast_gauc"]
        row["device_gain"] = row["device_gauc"] - row["start_gauc"]
        row["tail_device_gain"] = row["tail_device_gauc"] - row["tail_start_gauc"]
        for model in ("broadcast", "start", "device", "cloud"):
            row[f"bucket_{model}_gauc"] = bucket_gauc(devices, round_index, f"{model}_auc", n_buckets)
        row["bucket_device_gain_vs_broadcast"] = list(
            np.subtract(row["bucket_device_gauc"], row["bucket_broadcast_gauc"])
        )
        row["bucket_device_gain"] = list(np.subtract(row["bucket_device_gauc"], row["bucket_start_gauc"]))
        rows.append(row)
    return rows


def add_paired_cloud_gain(runs: dict[str, list[list[dict[str, Any]]]]) -> None:
    """`cloud_gain`: each run's cloud GAUC minus cloud_only's with the same seed, per round (paired)."""
    if "cloud_only" not in runs:
        return
    for per_seed in runs.values():
        for rows, base in zip(per_seed, runs["cloud_only"], strict=True):
            for row, ref in zip(rows, base, strict=True):
                row["cloud_gain"] = row["cloud_gauc"] - ref["cloud_gauc"]
                row["bucket_cloud_gain"] = list(np.subtract(row["bucket_cloud_gauc"], ref["bucket_cloud_gauc"]))


def mean_over_seeds(rows: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per round: the mean and the sample std (0 for one seed) over the seeds of every field, elementwise for the
    per-bucket lists; NaNs (e.g. no device in a bucket) are left out."""
    out = []
    for per_round in zip(*rows, strict=True):
        entry: dict[str, Any] = {"round": per_round[0]["round"], "n_seeds": len(per_round)}
        for name in per_round[0]:
            if name == "round":
                continue
            values = np.array([row[name] for row in per_round], dtype=np.float64)
            finite = np.isfinite(values)
            count = finite.sum(axis=0)
            total = np.where(finite, values, 0.0).sum(axis=0)
            mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
            spread = np.where(finite, (values - mean) ** 2, 0.0).sum(axis=0)
            std = np.where(count > 1, np.sqrt(spread / np.maximum(count - 1, 1)), 0.0)
            entry[name], entry[f"{name}_std"] = mean.tolist(), std.tolist()
        out.append(entry)
    return out


# files written before metrics.ks name the ranking metrics at 10 without the "@" (device_hr10, tail_cloud_ndcg10)
LEGACY = {"hr@10": "hr10", "ndcg@10": "ndcg10"}


def _key(row: dict[str, Any], name: str) -> str:
    """`name`, or its older alias in a file that lacks it (device_hr@10 → device_hr10)."""
    if name in row:
        return name
    for new, old in LEGACY.items():
        if name.endswith(new) and name[: -len(new)] + old in row:
            return name[: -len(new)] + old
    return name


def _value(row: dict[str, Any], name: str) -> float:
    """A field's value by `_key`, NaN when absent (a field newer than the file)."""
    value = row.get(_key(row, name))
    return math.nan if value is None else value


def _fmt(value: float, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _pm(row: dict[str, Any], name: str, signed: bool = False) -> str:
    """mean ± std over seeds (the std only with several seeds); "—" for a field the file lacks."""
    mean = _fmt(_value(row, name), signed)
    std = row.get(f"{_key(row, name)}_std")
    return f"{mean} ± {std:.4f}" if row["n_seeds"] > 1 and mean != "—" and std is not None else mean


def _num(row: dict[str, Any], name: str, spec: str, scale: float = 1.0) -> str:
    """A field formatted by `spec` after scaling, "—" when NaN or absent."""
    value = _value(row, name)
    return "—" if math.isnan(value) else format(scale * value, spec)


BASELINES = (
    "`broadcast`: the plain broadcast model W_t (θ̂ = 0, no starting patch), the honest baseline, so the headline "
    "`Δ` = device − broadcast (per seed, then averaged) is what a device gains over simply using the cloud's model. "
    "`start`: the model a device starts from (W_t, plus for dccl the cloud's starting meta-patch θ̃, which can be "
    "worse than W_t), so `device − start`, the second figure, is what the on-device step adds to that start."
)


def _bucket_gain(row: dict[str, Any]) -> str:
    """The per-bucket personalization gain's field: device − broadcast, or device − start in a file older than it."""
    return "bucket_device_gain_vs_broadcast" if "bucket_device_gain_vs_broadcast" in row else "bucket_device_gain"


def markdown(results: dict[str, Any]) -> str:
    """The tables (for this script's JSON, older files included: a field they lack shows as "—")."""
    split, seeds, mean = results["split"], results["seeds"], results["mean"]
    several = len(seeds) > 1
    lines = [
        f"# Strategies on {results['source']} — {split} split",
        "",
        f"Seeds {', '.join(map(str, seeds))} ({'mean ± sample std over seeds' if several else 'one seed'}), "
        f"{results['rounds']} rounds, overrides: `{' '.join(results['overrides']) or '(none)'}`.",
        f"Command: `{results['command']}`",
        "",
        BASELINES,
        "`device`: the personalized device models; `cloud`: W_{t+1} after the round's update; `tail`: activity "
        "bucket 0 (the least active quarter of users).",
        "",
        "## GAUC",
        "",
        "| strategy | round | broadcast | start | device | Δ = device − broadcast | device − start | cloud "
        "| tail broadcast | tail device | tail Δ | tail device − start | tail cloud | gate pass |",
        "|---|---|" + "---|" * 12,
    ]
    for strategy, rows in mean.items():
        for r in rows:
            gate = _num(r, "gate_pass_rate", ".2f")
            cells = [strategy, str(r["round"]), _pm(r, "broadcast_gauc"), _pm(r, "start_gauc"), _pm(r, "device_gauc")]
            cells += [_pm(r, "device_gain_vs_broadcast", True), _pm(r, "device_gain", True), _pm(r, "cloud_gauc")]
            cells += [_pm(r, "tail_broadcast_gauc"), _pm(r, "tail_device_gauc")]
            cells += [_pm(r, "tail_device_gain_vs_broadcast", True), _pm(r, "tail_device_gain", True)]
            cells += [_pm(r, "tail_cloud_gauc"), gate]
            lines.append("| " + " | ".join(cells) + " |")
    models = ("broadcast", "device", "cloud")
    lines += [
        "",
        "## HR@10, NDCG@10 and MRR",
        "",
        "The test positive ranked among its sampled negatives (`data.eval_negatives`); `broadcast` is the baseline "
        "the device models are compared with.",
        "",
        "| strategy | round | "
        + " | ".join(f"{metric} {model}" for metric in ("HR@10", "NDCG@10", "MRR") for model in models)
        + " | tail HR@10 broadcast | tail HR@10 device | tail NDCG@10 broadcast | tail NDCG@10 device | round s |",
        "|---|---|" + "---|" * 14,
    ]
    for strategy, rows in mean.items():
        for r in rows:
            cells = [strategy, str(r["round"])]
            cells += [_pm(r, f"{model}_{metric}") for metric in ("hr@10", "ndcg@10", "mrr") for model in models]
            cells += [_pm(r, f"tail_{model}_{metric}") for metric in ("hr@10", "ndcg@10") for model in models[:2]]
            lines.append("| " + " | ".join([*cells, _num(r, "t_round_s", ".0f")]) + " |")
    if any(not math.isnan(_value(r, "device_full_hr@10")) for rows in mean.values() for r in rows):
        lines += full_ranking_tables(mean, models)
    lines += [
        "",
        "## Device-side cost per round (means over participants; CoDA's candidates and kept samples)",
        "",
        "| strategy | round | candidates | kept | candidate KB | device compute p50 ms | device phase s |",
        "|---|---|" + "---|" * 5,
    ]
    for strategy, rows in mean.items():
        for r in rows:
            cells = [
                strategy,
                str(r["round"]),
                _num(r, "candidates_per_device", ".1f"),
                _num(r, "kept_per_device", ".1f"),
            ]
            cells += [_num(r, "candidate_bytes_per_device", ".1f", 1e-3), _num(r, "device_compute_p50_s", ".2f", 1e3)]
            lines.append("| " + " | ".join([*cells, _num(r, "t_devices_s", ".1f")]) + " |")
    if "cloud_only" in mean:
        rounds = [r["round"] for r in mean["cloud_only"]]
        lines += ["", "## Cloud GAUC minus cloud_only's (paired by seed)", ""]
        lines += ["| strategy | " + " | ".join(f"round {r}" for r in rounds) + " |", "|---|" + "---|" * len(rounds)]
        for strategy, rows in mean.items():
            lines.append(f"| {strategy} | " + " | ".join(_pm(r, "cloud_gain", True) for r in rows) + " |")
    labels = bucket_column_labels(results["bucket_quantiles"])
    older = any(_bucket_gain(r) == "bucket_device_gain" for rows in mean.values() for r in rows)
    for r_index in sorted({0, results["rounds"] - 1}):
        baseline = "start" if older else "broadcast"
        lines += ["", f"## Personalization gain (device − {baseline} GAUC) by user activity, round {r_index}", ""]
        lines += [
            "This file predates the broadcast baseline: device − start per bucket."
            if older
            else "Bucket GAUCs pooled from the per-device `device_auc` and `broadcast_auc`; device − start per bucket "
            "is in the JSON (`bucket_device_gain`).",
            "",
        ]
        lines += ["| strategy | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for strategy, rows in mean.items():
            r = rows[r_index]
            name = "bucket_device_gain" if older else "bucket_device_gain_vs_broadcast"
            cells = [
                _fmt(m, True) + (f" ± {sd:.4f}" if several and not math.isnan(m) else "")
                for m, sd in zip(r[name], r[f"{name}_std"], strict=True)
            ]
            lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    lines += ["", *(f"![{caption}]({name})" for name, caption in results["plots"])]
    lines += ["", f"Machine: {results['machine']}; torch threads {results['threads']}; {results['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def ordering_flips(mean: dict[str, list[dict[str, Any]]], index: int, name: str) -> list[str]:
    """Pairs of strategies that `<model>_<metric>` (name) orders one way by sampled and the other by full ranking in
    round `index` (a tie on either side is no flip: strategies with the same cloud tie on the cloud's metrics)."""
    values = {
        s: (_value(rows[index], name), _value(rows[index], name.replace("_", "_full_", 1))) for s, rows in mean.items()
    }
    flips = []
    for a, b in itertools.combinations(values, 2):
        (sampled_a, full_a), (sampled_b, full_b) = values[a], values[b]
        if (sampled_a - sampled_b) * (full_a - full_b) < 0:  # NaN compares False
            flips.append(f"{a} / {b}")
    return flips


def _order(mean: dict[str, list[dict[str, Any]]], index: int, name: str) -> str:
    """Strategies from best to worst by `name` in round `index`, tied values joined with "="."""
    ranked = sorted(((_value(rows[index], name), s) for s, rows in mean.items()), key=lambda v: -v[0])
    parts: list[str] = []
    for i, (value, strategy) in enumerate(ranked):
        tied = i > 0 and value == ranked[i - 1][0]
        parts.append(("= " if tied else ("> " if parts else "")) + strategy)
    return " ".join(parts)


def full_ranking_tables(mean: dict[str, list[dict[str, Any]]], models: tuple[str, ...]) -> list[str]:
    """The full-ranking table and whether any ordering of strategies flips between sampled and full ranking."""
    lines = [
        "",
        "## Full ranking: HR@10, NDCG@10 and MRR",
        "",
        "Each test positive ranked among every item its user has not interacted with in training or validation "
        "(`metrics.ranking=both`; docs/evaluation.md).",
        "",
        "| strategy | round | "
        + " | ".join(f"full {metric} {model}" for metric in ("HR@10", "NDCG@10", "MRR") for model in models)
        + " | tail full HR@10 broadcast | tail full HR@10 device |",
        "|---|---|" + "---|" * 11,
    ]
    for strategy, rows in mean.items():
        for r in rows:
            cells = [strategy, str(r["round"])]
            cells += [_pm(r, f"{model}_full_{metric}") for metric in ("hr@10", "ndcg@10", "mrr") for model in models]
            cells += [_pm(r, f"tail_{model}_full_hr@10") for model in models[:2]]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Sampled vs full ranking: does any ordering of strategies flip?",
        "",
        "Strategies ordered by the mean over seeds of each metric, sampled and full; a flip is a pair the two "
        "order differently (cloud_only, metapatch, local_finetune and coda share one cloud model, so they tie on "
        "`cloud`).",
        "",
        "| round | metric | by sampled ranking | by full ranking | pairs that flip |",
        "|---|---|---|---|---|",
    ]
    rounds = range(len(next(iter(mean.values()))))
    total = 0
    for index in rounds:
        for model in ("device", "cloud"):
            for metric in ("hr@10", "ndcg@10", "mrr"):
                name = f"{model}_{metric}"
                flips = ordering_flips(mean, index, name)
                total += len(flips)
                full = name.replace("_", "_full_", 1)
                cells = [str(index), name, _order(mean, index, name), _order(mean, index, full), ", ".join(flips)]
                lines.append("| " + " | ".join([*cells[:4], cells[4] or "none"]) + " |")
    lines += ["", f"Flipped pairs in all: {total}." if total else "No ordering flips."]
    return lines


def plot(results: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    """`OUT_rounds.png` (metrics per round: broadcast, device and cloud models) and `OUT_buckets.png`
    (personalization gain device − broadcast by activity bucket)."""
    mean, several = results["mean"], len(results["seeds"]) > 1
    colors = dict(zip(results["mean"], plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    for ax, (metric, title) in zip(axes, (("gauc", "GAUC"), ("hr@10", "HR@10"), ("ndcg@10", "NDCG@10")), strict=True):
        for strategy, rows in mean.items():
            rounds = [r["round"] for r in rows]
            for model, style in (("cloud", "-"), ("broadcast", ":"), ("device", "--")):
                # SAME_CLOUD_AS_CLOUD_ONLY update the cloud exactly as cloud_only, so they broadcast its models too;
                # cloud_only never personalizes
                if (model in ("cloud", "broadcast") and strategy in SAME_CLOUD_AS_CLOUD_ONLY) or (
                    model == "device" and strategy == "cloud_only"
                ):
                    continue
                values = [_value(r, f"{model}_{metric}") for r in rows]
                errors = [r.get(f"{_key(r, f'{model}_{metric}')}_std", math.nan) for r in rows] if several else None
                ax.errorbar(
                    rounds,
                    values,
                    yerr=errors,
                    fmt=style,
                    marker="o",
                    ms=3,
                    capsize=2,
                    color=colors[strategy],
                    label=f"{strategy} {model}",
                )
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_ylabel(f"{title}, {results['split']} split")
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(
        f"{results['source']}, {results['split']} split: cloud model after each round (solid), plain broadcast model "
        "W_t the round's devices received (dotted) and personalized device models (dashed), mean ± std over seeds",
        fontsize=10,
    )
    rounds_png = out.parent / f"{out.name}_rounds.png"
    fig.savefig(rounds_png, dpi=120)
    plt.close(fig)

    labels = bucket_column_labels(results["bucket_quantiles"])
    personalized = [s for s in mean if s != "cloud_only"]
    last = results["rounds"] - 1
    fig, axes = plt.subplots(1, 2 if last > 0 else 1, figsize=(12 if last > 0 else 7, 4), constrained_layout=True)
    width = 0.8 / max(len(personalized), 1)
    for ax, r_index in zip(np.atleast_1d(axes), sorted({0, last}), strict=True):
        for i, strategy in enumerate(personalized):
            row = mean[strategy][r_index]
            x = np.arange(len(labels)) - 0.4 + width * (i + 0.5)
            name = _bucket_gain(row)
            errors = row[f"{name}_std"] if several else None
            ax.bar(x, row[name], width, yerr=errors, capsize=2, color=colors[strategy], label=strategy)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xticks(np.arange(len(labels)), labels, fontsize=8)
        ax.set_xlabel("users' activity quantile (training interactions)")
        ax.set_ylabel("GAUC gain: device − broadcast")
        spread = f"mean ± std over {len(results['seeds'])} seeds" if several else f"seed {results['seeds'][0]}"
        ax.set_title(f"Personalization gain by user activity, round {r_index} ({spread})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    buckets_png = out.parent / f"{out.name}_buckets.png"
    fig.savefig(buckets_png, dpi=120)
    plt.close(fig)
    return [
        (rounds_png.name, "Cloud, broadcast and device metrics per round, mean ± std over seeds"),
        (buckets_png.name, "Personalization gain (device − broadcast) by user activity bucket, mean ± std over seeds"),
    ]


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_kept(strategy: str, seed: int, args: argparse.Namespace, work_dir: Path, stamp: dict[str, Any]) -> dict:
    """`run_one`'s rows and seconds, kept in OUT_runs/ with the commit that made them as the run finishes; with
    --resume, a kept run of the same settings (`stamp`) is reused instead, and the results list every commit."""
    kept = Path(f"{args.out}_runs") / f"{strategy}-{seed}.json"
    if args.resume and kept.is_file():
        saved = json.loads(kept.read_text())
        if saved["stamp"] == stamp:
            return {**saved, "reused": True}
    tic = time.perf_counter()
    rows = run_one(strategy, seed, args, work_dir)
    result = {"stamp": stamp, "source": source_commit(), "rows": rows, "seconds": time.perf_counter() - tic}
    kept.parent.mkdir(parents=True, exist_ok=True)
    temp = kept.with_suffix(".tmp")
    temp.write_text(json.dumps(result))
    temp.replace(kept)
    return {**result, "reused": False}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    source = source_commit()
    stamp = {"split": args.split, "rounds": args.rounds, "overrides": args.overrides}
    commits: dict[str, dict[str, Any]] = {}
    pairs = [(strategy, seed) for strategy in args.strategies for seed in args.seeds]
    done: dict[tuple[str, int], list[dict[str, Any]]] = {}

    def report(strategy: str, seed: int, result: dict[str, Any]) -> None:
        done[(strategy, seed)] = rows = result["rows"]
        commits[f"{strategy}-{seed}"] = result["source"]
        if not args.quiet:
            first, last = rows[0], rows[-1]
            how = "reused" if result["reused"] else f"{result['seconds']:.0f} s"
            print(
                f"{strategy} seed {seed}: round-0 device − broadcast {first['device_gain_vs_broadcast']:+.4f}"
                f" (− start {first['device_gain']:+.4f}), final cloud GAUC {last['cloud_gauc']:.4f} ({how})",
                flush=True,
            )

    with tempfile.TemporaryDirectory(prefix="dccl-strategies-") as tmp:
        try:
            if args.jobs == 1:
                for strategy, seed in pairs:
                    report(strategy, seed, run_kept(strategy, seed, args, Path(tmp), stamp))
            else:
                context = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(args.jobs, context, _start_worker, (args.threads,)) as pool:
                    futures = {pool.submit(run_kept, s, seed, args, Path(tmp), stamp): (s, seed) for s, seed in pairs}
                    for future in as_completed(futures):
                        report(*futures[future], future.result())
        except ConfigError as error:
            print(error, file=sys.stderr)
            return 2
    runs = {strategy: [done[(strategy, seed)] for seed in args.seeds] for strategy in args.strategies}
    add_paired_cloud_gain(runs)
    config = load_config(None, args.overrides)
    results = {
        "source": config.data.source,
        "bucket_quantiles": list(config.metrics.bucket_quantiles),
        "command": " ".join(["python", "experiments/strategies.py", *(argv if argv is not None else sys.argv[1:])]),
        "split": args.split,
        "seeds": args.seeds,
        "rounds": args.rounds,
        "overrides": args.overrides,
        "threads": args.threads,
        "jobs": args.jobs,
        **source,
        "run_commits": commits,  # the commit each run was made at (--resume may reuse runs of earlier commits)
        # the resolved config every run shares; each run sets its strategy and seed on top
        "base_config": load_config(
            None, [f"metrics.split={args.split}", f"rounds={args.rounds}", *args.overrides]
        ).model_dump(mode="json"),
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
    results["plots"] = plot(results, Path(args.out))
    json_path.write_text(json.dumps(results, indent=1))
    md_path.write_text(markdown(results))
    if not args.quiet:
        print(markdown(results))
        print(f"wrote {json_path}, {md_path} and the plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
