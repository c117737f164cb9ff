"""`dccl-sim report RUN_DIR`: a run directory's `report.md` with tables and PNG plots, and `report.html`, the same
page in one self-contained file with the plots embedded (`dccl_sim.pages`) (docs/design.md §7).

Reads only what a run writes (`config.json`, `rounds.parquet`, `devices.parquet`), so it works on a finished, a
stopped or a resumed run. Plots use matplotlib's Agg backend and are saved next to `report.md`:

- `metrics.png`: GAUC per round of the start (broadcast), personalized device and cloud models; tail dashed.
- `latency.png`: the measured phases of each round, stacked, with the modelled deployment round as a marker.
- `device_times.png`: per-device measured compute time and modelled deployment time, over all rounds.
- `personalization.png`: device AUC − start AUC by activity bucket, mean with 95% confidence intervals.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dccl_sim import metrics
from dccl_sim.pages import markdown_table, write_html_page
from dccl_sim.results import check_run_dir, read_config, read_table

PLOTS = {
    "metrics": "metrics.png",
    "latency": "latency.png",
    "device_times": "device_times.png",
    "personalization": "personalization.png",
}
MODELS = (("broadcast", "broadcast (θ̂ = 0)", "tab:gray"), ("start", "start (starting patch)", "tab:blue"))
MODELS += (("device", "device (personalized)", "tab:orange"), ("cloud", "cloud (after update)", "tab:green"))
# The device phase's wall clock includes the gather (results arriving after the first), so the bar splits it.
PHASES = (
    ("broadcast", "t_broadcast_s"),
    ("devices (to first result)", None),
    ("gather", "t_gather_s"),
    ("distill (cloud update)", "t_distill_s"),
    ("eval", "t_eval_s"),
    ("checkpoint", "t_checkpoint_s"),
    ("other", None),
)
MAX_GAIN_ROUNDS = 5
HTML = "report.html"


def write_report(run_dir: Path) -> Path:
    """Write `run_dir/report.md`, its PNG plots and `run_dir/report.html` (the same page, plots embedded); return
    the markdown file's path."""
    run_dir = Path(run_dir)
    config, rounds, devices = read_run(run_dir)
    if "broadcast_gauc" in rounds:
        rounds["device_minus_broadcast"] = rounds["device_gauc"] - rounds["broadcast_gauc"]
    import matplotlib

    matplotlib.use("Agg")
    plots = [
        ("GAUC per round", _plot_metrics(rounds, run_dir / PLOTS["metrics"])),
        ("Measured round phases", _plot_latency(rounds, run_dir / PLOTS["latency"])),
    ]
    if devices is not None:
        plots.append(("Per-device time", _plot_device_times(devices, config, run_dir / PLOTS["device_times"])))
        gain = _plot_gain(devices, config, run_dir / PLOTS["personalization"])
        plots.append(("Personalization gain by activity bucket", gain))
    path = run_dir / "report.md"
    text = _markdown(run_dir, config, rounds, devices, plots)
    path.write_text(text)
    write_html_page(text, run_dir, run_dir / HTML, title=f"dccl-sim report: {run_dir.name}")
    return path


def read_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The saved config (as a dict), the rounds table and the devices table (None if absent), as numpy columns
    sorted by round."""
    check_run_dir(run_dir)
    config = read_config(run_dir)
    rounds = _columns(run_dir / "rounds.parquet", ["round", "strategy", "n_devices"])
    order = np.argsort(rounds["round"], kind="stable")
    rounds = {name: values[order] for name, values in rounds.items()}
    devices_file = run_dir / "devices.parquet"
    devices = _columns(devices_file) if devices_file.is_file() else None
    return config, rounds, devices


def bucket_gauc(devices: dict[str, np.ndarray], round_index: int, column: str, n_buckets: int) -> list[float]:
    """GAUC of a per-device AUC column (`start_auc`, `device_auc`, `cloud_auc`) in one round, pooled as the round
    records pool it: per activity bucket 0..n_buckets-1, then over all devices (the last entry)."""
    rows = devices["round"] == round_index
    auc, bucket = devices[column][rows], devices["bucket"][rows]
    n_test = devices["n_test"][rows].astype(np.float64)
    per_bucket = [metrics.pooled_gauc(auc[bucket == b], n_test[bucket == b]) for b in range(n_buckets)]
    return [*per_bucket, metrics.pooled_gauc(auc, n_test)]


def bucket_ranking(devices: dict[str, np.ndarray], round_index: int, column: str, n_buckets: int) -> list[float]:
    """A per-device ranking column (e.g. `device_full_ndcg@10`) in one round, pooled as the round records pool it
    (each device weighted by its queries, `n_queries`): per activity bucket 0..n_buckets-1, then over all devices
    (the last entry); NaN where no device of the bucket has queries, or the run lacks the column."""
    if column not in devices or "n_queries" not in devices:
        return [float("nan")] * (n_buckets + 1)
    rows = devices["round"] == round_index
    values, bucket = devices[column][rows].astype(np.float64), devices["bucket"][rows]
    queries = devices["n_queries"][rows].astype(np.float64)

    def pooled(mask: np.ndarray) -> float:
        used = mask & (queries > 0) & np.isfinite(values)
        total = queries[used].sum()
        return float((values[used] * queries[used]).sum() / total) if total else float("nan")

    return [*(pooled(bucket == b) for b in range(n_buckets)), pooled(np.ones(len(values), dtype=bool))]


def bucket_column_labels(quantiles: Sequence[float]) -> list[str]:
    """Labels of `bucket_gauc`'s entries: each bucket's activity quantile range (the first marked as the tail),
    then "all"."""
    edges = [0.0, *quantiles, 1.0]
    labels = [f"{lo:.0%}–{hi:.0%}" for lo, hi in itertools.pairwise(edges)]
    labels[0] += " (tail)"
    return [*labels, "all"]


def _columns(path: Path, required: list[str] | None = None) -> dict[str, np.ndarray]:
    table = read_table(path, required)
    return {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}


# ---------------------------------------------------------------- markdown


def _markdown(run_dir, config, rounds, devices, plots) -> str:
    n = len(rounds["round"])
    ranking_kind = _get(config, "metrics.ranking", "sampled")
    sampled, full = ranking_kind != "full", ranking_kind != "sampled"
    lines = [f"# dccl-sim report: `{run_dir.name}`", ""]
    lines += [f"- **{key}**: {value}" for key, value in _header(config, rounds).items()]
    lines += ["", f"Finished rounds: {n} of {config.get('rounds', '?')} configured.", ""]
    if "no_device_results" in rounds and rounds["no_device_results"].any():
        empty = ", ".join(str(r) for r in rounds["round"][rounds["no_device_results"].astype(bool)])
        lines += [
            f"**Rounds without any device result: {empty}.** Every sampled device was unavailable, late (a wall-clock "
            "`runtime.deadline_s` drops whole packs) or lost, so their device metrics are missing and the cloud "
            "learned nothing from devices in them.",
            "",
        ]
    lines += ["## Metrics per round", ""]
    lines += [
        "`broadcast` is the plain broadcast model (θ̂ = 0, no starting patch), `start` the model the devices began "
        "from (dccl adds its starting meta-patch θ̃), `device` the personalized on-device models (the personalization "
        "gain is `device − broadcast`), "
        "`cloud` the cloud model after the round's update; `tail` is the least active bucket of devices (bucket 0). "
        f"Evaluated on the `{_get(config, 'metrics.split', 'test')}` split; a positive is ranked among "
        + {
            "sampled": f"its {_get(config, 'data.eval_negatives', '?')} sampled negatives",
            "full": "every item its user has not interacted with (`full`; AUC and GAUC on the sampled negatives)",
            "both": f"its {_get(config, 'data.eval_negatives', '?')} sampled negatives and, in the `full` rows, "
            "among every item its user has not interacted with",
        }[ranking_kind]
        + (
            f", over a fixed seeded sample of {eval_devices:,} devices (`metrics.eval_devices`)."
            if isinstance(eval_devices := _get(config, "metrics.eval_devices"), int)
            else "."
        ),
        "",
    ]
    lines += _table(
        rounds,
        [
            ("round", "round", "d"),
            ("broadcast GAUC", "broadcast_gauc", ".4f"),
            ("start GAUC", "start_gauc", ".4f"),
            ("device GAUC", "device_gauc", ".4f"),
            ("device − broadcast", "device_minus_broadcast", "+.4f"),
            ("cloud GAUC", "cloud_gauc", ".4f"),
            ("tail broadcast GAUC", "tail_broadcast_gauc", ".4f"),
            ("tail device GAUC", "tail_device_gauc", ".4f"),
            ("tail cloud GAUC", "tail_cloud_gauc", ".4f"),
            ("gate pass rate", "gate_pass_rate", ".2f"),
        ],
    )
    lines.append("")
    k = _get(config, "metrics.k", 10)
    kinds = [(kind, label) for kind, label, wanted in (("", "", sampled), ("full_", "full ", full)) if wanted]
    for kind, kind_label in kinds:
        ranking = [("round", "round", "d")]
        # the @K columns; runs written before `metrics.ks` have only the *10 names (the same metrics at k = 10)
        for metric, label in ((f"hr@{k}", f"HR@{k}"), (f"ndcg@{k}", f"NDCG@{k}"), ("mrr", "MRR")):
            legacy = {f"hr@{k}": "hr10", f"ndcg@{k}": "ndcg10"}.get(metric, metric)
            for model in ("broadcast", "device", "cloud"):
                name = f"{model}_{kind}{metric}"
                name = name if name in rounds or kind else f"{model}_{legacy}"
                ranking.append((f"{model} {kind_label}{label}", name, ".4f"))
        lines += [*_table(rounds, ranking), ""]
    if devices is not None and "n_queries" in devices and n:
        lines += _bucket_ranking_table(config, devices, int(rounds["round"][-1]), k, kinds)
    lines += ["## Latency per round", ""]
    lines += [
        "Measured wall-clock seconds of the simulator's phases (the device phase includes the gather: the time "
        "after the first result arrived), per-device compute time, and the modelled deployment round "
        "(`sim_round_s`: completion of the last device under the deadline plus the cloud's modelled time). Peak "
        "memory: the driver and every process it started (an embedded Ray's workers included), proportional set "
        "size, sampled once a second during the round.",
        "",
    ]
    lines += _table(
        rounds,
        [
            ("round", "round", "d"),
            ("participants", "n_participants", "d"),
            ("stragglers", "n_stragglers", "d"),
            ("broadcast s", "t_broadcast_s", ".3g"),
            ("devices s", "t_devices_s", ".3g"),
            ("gather s", "t_gather_s", ".3g"),
            ("distill s", "t_distill_s", ".3g"),
            ("eval s", "t_eval_s", ".3g"),
            ("checkpoint s", "t_checkpoint_s", ".3g"),
            ("round s", "t_round_s", ".3g"),
            ("device compute p50 / p95 / max s", None, None),
            ("modelled round s", "sim_round_s", ".3g"),
            ("peak memory MiB", "peak_memory_mb", ",.0f"),
        ],
    )
    lines += ["", "## Plots", ""]
    for title, (filename, caption) in plots:
        lines += [f"### {title}", "", f"![{title}]({filename})", "", caption, ""]
    if devices is None:
        lines += ["No devices.parquet in this run directory: per-device plots left out.", ""]
    return "\n".join(lines)


def _bucket_ranking_table(
    config: dict, devices: dict[str, np.ndarray], round_index: int, k: int, kinds: list[tuple[str, str]]
) -> list[str]:
    """NDCG@k of the broadcast, personalized and cloud models per activity bucket in one round (`bucket_ranking`)."""
    quantiles = _get(config, "metrics.bucket_quantiles", [])
    labels = bucket_column_labels(quantiles)
    lines = [f"NDCG@{k} by users' activity bucket (quantile range of training interactions), round {round_index}:", ""]
    lines += ["| model | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for kind, kind_label in kinds:
        for model in ("broadcast", "device", "cloud"):
            values = bucket_ranking(devices, round_index, f"{model}_{kind}ndcg@{k}", len(quantiles) + 1)
            cells = ["—" if np.isnan(v) else f"{v:.4f}" for v in values]
            lines.append(f"| {model} {kind_label}NDCG@{k} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _header(config: dict, rounds: dict[str, np.ndarray]) -> dict[str, str]:
    def seconds(value: Any) -> str:
        return "none" if value is None else f"{value:g} s"

    participation = _get(config, "runtime.participation", 1.0)
    return {
        "strategy": str(rounds["strategy"][-1]),
        "devices": f"{int(rounds['n_devices'][-1]):,} ({participation:.0%} sampled per round)",
        "rounds": f"{len(rounds['round'])} (rounds {int(rounds['round'][0])}..{int(rounds['round'][-1])})",
        "data": f"{_get(config, 'data.source')} (seed {config.get('seed')})",
        "runtime": f"{_get(config, 'runtime.backend')}, devices_per_actor={_get(config, 'runtime.devices_per_actor')}",
        "device step": (
            f"local_epochs={_get(config, 'device.local_epochs')}, lr={_get(config, 'device.lr')}, "
            f"gate={_get(config, 'device.gate')}, patch.k={_get(config, 'patch.k')}"
        ),
        "cloud": f"beta={_get(config, 'cloud.beta')}, pretrain_epochs={_get(config, 'cloud.pretrain_epochs')}",
        "deadlines": (
            f"simulator gather {seconds(_get(config, 'runtime.deadline_s'))}, "
            f"modelled deployment {seconds(_get(config, 'latency.deadline_s'))}"
        ),
    }


def _get(config: dict, dotted: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _table(rounds: dict[str, np.ndarray], columns: list[tuple[str, str | None, str | None]]) -> list[str]:
    present = [c for c in columns if c[1] is None or c[1] in rounds]
    rows = []
    for i in range(len(rounds["round"])):
        cells = []
        for _, name, spec in present:
            if name is None:  # the compute spread, three columns in one cell
                cells.append(" / ".join(_fmt(rounds[f"device_compute_{q}_s"][i], ".3g") for q in ("p50", "p95", "max")))
            else:
                cells.append(_fmt(rounds[name][i], spec))
        rows.append(cells)
    return markdown_table([c[0] for c in present], rows)


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(int(value) if spec == "d" else float(value), spec)


# ---------------------------------------------------------------- plots


def _figure(width: float = 7.0, height: float = 4.2, ncols: int = 1):
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height), dpi=120, layout="constrained")


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path)
    plt.close(fig)


def _round_axis(ax, round_numbers: np.ndarray) -> None:
    ax.set_xlabel("round")
    step = max(1, math.ceil(len(round_numbers) / 12))
    ax.set_xticks(round_numbers[::step])


def _plot_metrics(rounds, path: Path) -> tuple[str, str]:
    # all devices and the long tail in panels of their own: the tail's GAUC often sits far from the overall one, and
    # on one shared axis the gap would flatten the model-to-model differences a reader looks for
    fig, axes = _figure(10.0, 4.2, ncols=2)
    x = rounds["round"]
    # start is drawn wide underneath, as device often sits on it
    shown = [m for m in MODELS if f"{m[0]}_gauc" in rounds]  # runs written before the broadcast baseline lack it
    for ax, (prefix, subset) in zip(
        axes, (("", "all devices"), ("tail_", "long tail (bucket 0, least active)")), strict=True
    ):
        for (model, label, color), width in zip(shown, (6.0, 4.0, 1.8, 1.8)[-len(shown) :], strict=True):
            alpha = 0.55 if model in ("broadcast", "start") else 1.0
            ax.plot(x, rounds[f"{prefix}{model}_gauc"], color=color, marker="o", lw=width, alpha=alpha, label=label)
        _round_axis(ax, x)
        ax.set_title(subset, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GAUC (per-device AUC,\nweighted by test samples)")
    fig.suptitle(f"GAUC per round — {rounds['strategy'][-1]}, {int(rounds['n_devices'][-1]):,} devices")
    fig.legend(handles=axes[0].get_lines(), fontsize=8, loc="outside right upper")
    _save(fig, path)
    return path.name, "Left: all devices; right: the long-tail bucket (least active devices), each on its own scale."


def _plot_latency(rounds, path: Path) -> tuple[str, str]:
    fig, ax = _figure(8.0, 4.2)
    x = rounds["round"]
    parts = {label: rounds[name].astype(float) for label, name in PHASES if name is not None}
    parts["devices (to first result)"] = rounds["t_devices_s"] - rounds["t_gather_s"]
    parts["other"] = np.maximum(rounds["t_round_s"] - sum(parts.values()), 0.0)
    bottom = np.zeros(len(x))
    colors = ("tab:purple", "tab:orange", "tab:red", "tab:green", "tab:blue", "tab:gray", "lightgray")
    for (label, _), color in zip(PHASES, colors, strict=True):
        ax.bar(x, parts[label], bottom=bottom, color=color, label=label, width=0.7)
        bottom += parts[label]
    ax.scatter(
        x, rounds["sim_round_s"], color="black", marker="D", zorder=3, label="modelled deployment\nround (sim_round_s)"
    )
    _round_axis(ax, x)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("seconds (wall clock)")
    ax.set_title("Measured round phases (stacked)")
    ax.grid(axis="y", alpha=0.3)
    # legend entries top to bottom as the bars stack, the marker first
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)
    caption = (
        "Bars: the simulator's measured wall clock per phase ('other' is the rest of `t_round_s`: sampling, "
        "bookkeeping, records). Diamonds: the modelled deployment round latency (`sim_round_s`)."
    )
    return path.name, caption


def _log_bins(values: np.ndarray, count: int = 30) -> np.ndarray:
    low, high = values.min(), values.max()
    if high <= low * 1.01:
        low, high = low / 1.5, high * 1.5
    return np.geomspace(low, high, count + 1)


def _plot_device_times(devices, config, path: Path) -> tuple[str, str]:
    fig, axes = _figure(9.0, 3.8, ncols=2)
    finished = ~devices["straggler"].astype(bool)
    series = (
        ("measured compute time (simulator)", devices["compute_s"][finished], "tab:blue"),
        ("modelled deployment time", devices["sim_time_s"], "tab:orange"),
    )
    for ax, (label, values, color) in zip(axes, series, strict=True):
        values = values[np.isfinite(values) & (values > 0)]
        if len(values) == 0:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.hist(values, bins=_log_bins(values), color=color, alpha=0.85)
            median = float(np.median(values))
            ax.axvline(median, color="black", ls=":", label=f"median {median:.3g} s")
            ax.set_xscale("log")
        ax.set_xlabel("seconds per device per round (log scale)")
        ax.set_ylabel("device-rounds")
        ax.set_title(f"{label}, n={len(values):,}", fontsize=10)
        ax.grid(alpha=0.3)
    deadline = _get(config, "latency.deadline_s")
    if deadline is not None:
        axes[1].axvline(deadline, color="red", ls="--", label=f"deadline {deadline:g} s")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    rounds_seen = len(np.unique(devices["round"]))
    fig.suptitle(f"Per-device time, {len(devices['round']):,} device-rounds over {rounds_seen} round(s)")
    _save(fig, path)
    caption = (
        "Left: each device's share of its pack's measured compute time (stragglers left out). Right: the "
        "deployment model's time (download + training FLOPs / device speed + upload), stragglers included."
    )
    return path.name, caption


def _bucket_labels(config: dict, counts: np.ndarray) -> list[str]:
    """`b: low%–high%` from the configured quantiles (when they match), the device count, and the tail marked."""
    quantiles = [0.0, *_get(config, "metrics.bucket_quantiles", []), 1.0]
    labels = []
    for b, count in enumerate(counts):
        span = f": {quantiles[b]:.0%}–{quantiles[b + 1]:.0%}" if len(quantiles) == len(counts) + 1 else ""
        labels.append(f"{b}{span}\nn={count}")
    labels[0] += " (long tail)"
    return labels


def _plot_gain(devices, config, path: Path) -> tuple[str, str]:
    fig, ax = _figure()
    # against the plain broadcast model (θ̂ = 0); runs written before it was recorded fall back to the start model
    baseline = "broadcast_auc" if np.isfinite(devices.get("broadcast_auc", np.array([np.nan]))).any() else "start_auc"
    gain = devices["device_auc"] - devices[baseline]
    buckets = devices["bucket"].astype(int)
    count = int(buckets.max()) + 1 if len(buckets) else 1
    all_rounds = np.unique(devices["round"])
    picks = np.unique(np.linspace(0, len(all_rounds) - 1, min(MAX_GAIN_ROUNDS, len(all_rounds))).round())
    shown = all_rounds[picks.astype(int)]
    width = 0.8 / len(shown)
    any_value = False
    for i, r in enumerate(shown):
        mean, half = np.full(count, np.nan), np.full(count, np.nan)
        for b in range(count):
            values = gain[(devices["round"] == r) & (buckets == b)]
            values = values[np.isfinite(values)]
            if len(values):
                mean[b] = values.mean()
                half[b] = 1.96 * values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0.0
        any_value |= bool(np.isfinite(mean).any())
        x = np.arange(count) - 0.4 + width * (i + 0.5)
        ax.errorbar(x, mean, yerr=half, fmt="o", capsize=3, label=f"round {int(r)}")
    ax.axhline(0.0, color="black", lw=0.8)
    last = devices["round"] == shown[-1]
    per_bucket = np.bincount(buckets[last & np.isfinite(gain)], minlength=count)
    ax.set_xticks(np.arange(count), _bucket_labels(config, per_bucket))
    ax.set_xlabel(f"activity bucket (quantile range of training interactions); n = evaluated in round {shown[-1]}")
    ax.set_ylabel(f"AUC gain: device − {baseline.removesuffix('_auc')}")
    ax.set_title("Personalization gain per device, mean ± 95% CI")
    ax.grid(axis="y", alpha=0.3)
    finite = gain[np.isfinite(gain)]
    if len(finite) and not finite.any():
        note = "every device model equals the broadcast model it started from:\nno personalization in this run"
        ax.text(0.5, 0.85, note, ha="center", transform=ax.transAxes, fontsize=9)
    if any_value:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no personalized device models in this run", ha="center", transform=ax.transAxes)
    _save(fig, path)
    caption = (
        "Per device: AUC of its personalized model minus AUC of the broadcast model it started from, on its own "
        f"evaluation samples; rounds shown: {', '.join(str(int(r)) for r in shown)}."
    )
    return path.name, caption
