"""`dccl-sim sweep`: one configuration run over a grid of device counts and other settings (docs/design.md §7).

The grid is the product of `--devices 10,100,1000` (the `data.num_devices` axis) and every `--set KEY=A,B,...`
whose value has commas and is not a YAML list or quoted (`--set runtime.num_actors=1,2`); other `--set` values
apply to every point. The data source is `synthetic` unless the config file or a `--set` names one. Each point
runs with `dccl_sim.runtime.session.run` into its own run directory, `OUT/devices=N[/KEY=VALUE...]`.

`OUT/sweep.parquet` has one row per point (see `summarize_point`), `OUT/sweep_latency.png` plots round latency
against device count, log-log, and `OUT/sweep.md` and `OUT/sweep.html` (one file, the plot embedded) show the table
a terminal shows and the plot.

Shared or isolated. By default every point runs in this process, on one Ray (`dccl_sim.runtime.shared`): imports,
Ray's start and the ML-100K parse are paid once, and points that share a dataset and pretraining read them from
the caches under `data.cache_dir` that the first one wrote. Each point still gets new actors, which load its data and
time its rounds as a single run would; what sharing changes is set-up and memory (docs/design.md §7, "Sweeps").
`isolate=True` (`--isolate`) runs each point in a fresh (spawned) process that starts its own Ray, as a single
`dccl-sim run` does: slower, and the way to measure each point's set-up and peak memory on its own.

Peak memory. `peak_memory_mb` is the highest proportional set size, during the point's run, of the process that
ran it and every process it started (an embedded Ray's raylet, object store and workers included), sampled in the
background (`dccl_sim.runtime.memory`): data preparation and pretraining included. `start_memory_mb` is that
process tree's size when the point began: in a shared sweep, the shared Ray and what earlier points left in this
process, which the peak includes too.
"""

from __future__ import annotations

import gc
import itertools
import math
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from dccl_sim.config import ConfigError, SimConfig, apply_overrides, build_config, read_config_file
from dccl_sim.pages import markdown_table, write_html_page
from dccl_sim.runtime.memory import MemoryMonitor
from dccl_sim.runtime.run_dir import holds_results

if TYPE_CHECKING:
    from dccl_sim.runtime.base import Runtime

DEVICES_KEY = "data.num_devices"
PLOT = "sweep_latency.png"
HTML = "sweep.html"
PHASES = ("t_round_s", "t_devices_s", "t_distill_s", "t_eval_s", "t_broadcast_s", "t_gather_s", "t_checkpoint_s")


@dataclass(frozen=True)
class SweepPoint:
    """One grid point: the swept values (key → raw text, in axis order) and the config it runs."""

    values: dict[str, str]
    config: SimConfig


def point_dir(values: dict[str, str]) -> str:
    """A point's run directory under OUT: `devices=N`, then `KEY=VALUE` per other axis, nested."""
    parts = [
        f"devices={value}" if key == DEVICES_KEY else f"{key}={value.replace('/', '-')}"
        for key, value in values.items()
    ]
    return "/".join(parts) or "base"


def parse_devices(text: str) -> list[str]:
    """`10,100,1000` → ['10', '100', '1000'], each a positive integer."""
    values = [v.strip() for v in text.split(",")]
    for value in values:
        if not value.isdigit() or int(value) == 0:
            raise ConfigError(f"--devices expects positive integers separated by commas, e.g. 10,100; got {text!r}")
    return values


def split_axes(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Split `--set` overrides into those every point shares and sweep axes (key → raw values, in order).

    A value is an axis when it has a comma and is not a YAML flow list or mapping (`[1,2]`, `{a: 1}`) or a
    quoted string: `runtime.num_actors=1,2` is an axis, `model.mlp_hidden=[200,80]` is one value."""
    fixed: list[str] = []
    axes: dict[str, list[str]] = {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        key, text = key.strip(), raw.strip()
        if not sep or not key or "," not in text or text[0] in "[{'\"":
            fixed.append(override)
            continue
        values = [v.strip() for v in text.split(",")]
        if any(not v for v in values):
            raise ConfigError(f"--set {key}: empty value in the sweep list {text!r}")
        if key in axes:
            raise ConfigError(f"--set {key}: swept twice; give all its values in one --set")
        axes[key] = values
    return fixed, axes


def build_grid(
    devices: list[str] | None,
    overrides: list[str],
    config_file: Path | None = None,
    out_dir: Path = Path("runs/sweep"),
) -> list[SweepPoint]:
    """Every point's validated config, before anything runs (so a typo in the last point fails at once)."""
    fixed, axes = split_axes(overrides)
    if devices is not None:
        if DEVICES_KEY in axes or any(o.partition("=")[0].strip() == DEVICES_KEY for o in fixed):
            raise ConfigError(f"give device counts with --devices or --set {DEVICES_KEY}, not both")
        axes = {DEVICES_KEY: devices, **axes}
    base = read_config_file(config_file) if config_file is not None else {}
    sets_source = "source" in base.get("data", {}) or any(o.partition("=")[0].strip() == "data.source" for o in fixed)
    if "data.source" in axes:
        sets_source = True
    head = [] if sets_source else ["data.source=synthetic"]
    points = []
    for combination in itertools.product(*axes.values()):
        values = dict(zip(axes, combination, strict=True))
        point_overrides = head + fixed + [f"{key}={value}" for key, value in values.items()]
        point_overrides.append(f"output.out_dir={out_dir / point_dir(values)}")
        config = build_config(apply_overrides(base, point_overrides))
        points.append(SweepPoint(values, config))
    done = [p.config.output.out_dir for p in points if holds_results(Path(p.config.output.out_dir))]
    if done and not points[0].config.output.overwrite:
        raise ConfigError(
            f"{out_dir} already holds this sweep's runs ({done[0]}{' ...' if len(done) > 1 else ''}); replace them "
            "with --overwrite or choose another --out"
        )
    return points


def _run_point(config: SimConfig, runtime: Runtime) -> dict[str, Any]:
    """Run one point on `runtime`: what its sweep row holds beyond its run directory's records."""
    from dccl_sim.runtime.session import run

    with MemoryMonitor() as memory:
        start_memory = memory.take_peak()
        state = run(config, runtime=runtime)
        return {
            "peak_memory_mb": memory.take_peak(),
            "start_memory_mb": start_memory,
            "pretrain_cached": state.pretrain_cached,
            "ray_session": runtime.session_name,
        }


def _run_isolated(config_json: str) -> dict[str, Any]:
    """`_run_point` in a fresh process, on the runtime its config names, made anew."""
    from dccl_sim.runtime.session import make_runtime

    config = SimConfig.model_validate_json(config_json)
    return _run_point(config, make_runtime(config))


def summarize_point(run_dir: Path) -> dict[str, Any]:
    """One sweep row from a finished run directory.

    Latencies are means over the run's rounds. `devices_per_s` = Σ participants / Σ `t_devices_s` and
    `samples_per_s` = Σ `n_train` / Σ `t_devices_s`: throughput of the simulator's device phase in wall-clock
    time, where `n_train` is each participating device's positive training interactions in the round's window
    (devices.parquet; the negatives sampled with them and repeated epochs are not counted). `max_round_memory_mb`
    is the highest of the rounds' `peak_memory_mb` (setup and pretraining excluded); `setup_s` the time from the
    start to the first round (`t_setup_s`; NaN for runs made before it was recorded)."""
    rounds = pq.read_table(run_dir / "rounds.parquet")
    devices = pq.read_table(run_dir / "devices.parquet")
    col = {name: rounds[name].to_numpy() for name in rounds.column_names if name != "strategy"}
    finished = ~devices["straggler"].to_numpy()
    device_time = float(col["t_devices_s"].sum())
    row: dict[str, Any] = {
        "n_devices": int(col["n_devices"][-1]),
        "rounds": len(col["round"]),
        "strategy": rounds["strategy"][0].as_py(),
        "mean_participants": float(col["n_participants"].mean()),
    }
    row |= {f"mean_{name}": float(col[name].mean()) for name in (*PHASES, "sim_round_s")}
    row["devices_per_s"] = float(col["n_participants"].sum()) / device_time if device_time > 0 else math.nan
    n_train = float(devices["n_train"].to_numpy()[finished].sum())
    row["samples_per_s"] = n_train / device_time if device_time > 0 else math.nan
    row["max_round_memory_mb"] = float(np.nanmax(col["peak_memory_mb"])) if "peak_memory_mb" in col else math.nan
    row["setup_s"] = float(col["t_setup_s"][0]) if "t_setup_s" in col else math.nan
    row["final_cloud_gauc"] = float(col["cloud_gauc"][-1])
    row["final_device_gauc"] = float(col["device_gauc"][-1])
    return row


def run_sweep(
    points: list[SweepPoint],
    out_dir: Path,
    isolate: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every point in order, writing `sweep.parquet`, the plot and the pages after each (a stopped sweep keeps
    what finished). `isolate`: each point in a fresh process with its own Ray; else all in this one, sharing Ray.

    Beyond `summarize_point`, a row holds `wall_s` (the point from start to end, its process's start and Ray's
    start and stop included where it pays them), `sweep_elapsed_s` (from the sweep's start to the point's end: the
    last row's is the sweep's wall time), `isolated`, `ray_session` (the Ray session the point ran on; null
    in-process), `pretrain_cached` (its pretrained cloud read from the cache) and the memory figures above."""
    from dccl_sim.runtime.shared import SharedRay  # torch and the runtimes only once a sweep runs

    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with SharedRay() as shared:
        for point in points:
            tic = time.perf_counter()
            if isolate:
                with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                    measured = pool.submit(_run_isolated, point.config.model_dump_json()).result()
            else:
                measured = _run_point(point.config, shared.runtime_for(point.config))
                gc.collect()  # what the point left in cycles (object references among them) goes before the next
            row = {key: _typed(point, key) for key in point.values}
            row |= summarize_point(Path(point.config.output.out_dir))
            row |= {"wall_s": time.perf_counter() - tic, **measured, "isolated": isolate}
            row |= {"sweep_elapsed_s": time.perf_counter() - started, "run_dir": str(point.config.output.out_dir)}
            rows.append(row)
            write_table(rows, out_dir / "sweep.parquet")
            plot_latency(rows, list(point.values), out_dir / PLOT)
            write_pages(rows, list(point.values), out_dir)
            if on_row is not None:
                on_row(row)
    return rows


def summary_line(rows: list[dict[str, Any]]) -> str:
    """The sweep's wall time, split into set-up, rounds and the rest, and how its points ran."""
    total = rows[-1]["sweep_elapsed_s"]
    setup = sum(row["setup_s"] for row in rows)
    rounds = sum(row["mean_t_round_s"] * row["rounds"] for row in rows)
    sessions = len({row["ray_session"] for row in rows} - {None})
    if rows[-1]["isolated"]:
        how = "each point in a fresh process" + (" with its own Ray" if sessions else "") + " (--isolate)"
    else:
        how = "every point in one process" + (f" on {sessions} Ray session{'s' * (sessions > 1)}" if sessions else "")
        how += "; memory includes what earlier points left (--isolate for each point's own)"
    return (
        f"{len(rows)} points in {total:.0f} s: set-up {setup:.0f} s, rounds {rounds:.0f} s, "
        f"the rest {total - setup - rounds:.0f} s (processes, Ray, writing); {how}"
    )


def _typed(point: SweepPoint, key: str) -> Any:
    """A swept value as the config holds it (int, float, bool, str), for a typed Parquet column."""
    node: Any = point.config
    for part in key.split("."):
        node = getattr(node, part)
    return node if isinstance(node, bool | int | float | str) else str(yaml.safe_load(point.values[key]))


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    columns = {name: [row.get(name) for row in rows] for name in rows[0]}
    arrays = {}
    for name, values in columns.items():
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # a swept key with mixed types, e.g. devices_per_actor=1,auto
            arrays[name] = pa.array([str(v) for v in values])
    pq.write_table(pa.table(arrays), path)


def plot_latency(rows: list[dict[str, Any]], swept: list[str], path: Path) -> None:
    """Round latency against device count, log-log: one colour per combination of the other swept settings;
    solid measured round, dotted measured device phase, dashed modelled deployment round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    others = [key for key in swept if key != DEVICES_KEY]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in others), []).append(row)
    fig, ax = plt.subplots(figsize=(8.0, 4.5), dpi=120, layout="constrained")
    styles = (("mean_t_round_s", "-", "o"), ("mean_t_devices_s", ":", "s"), ("mean_sim_round_s", "--", "^"))
    colors = plt.get_cmap("tab10").colors
    handles = []
    for (values, members), color in zip(groups.items(), itertools.cycle(colors)):
        members = sorted(members, key=lambda r: r["n_devices"])
        x = np.array([r["n_devices"] for r in members])
        for column, line, marker in styles:
            ax.plot(x, [r[column] for r in members], color=color, ls=line, marker=marker)
        if others:
            label = ", ".join(f"{key}={value}" for key, value in zip(others, values, strict=True))
            handles.append(Line2D([], [], color=color, lw=3, label=label))
    handles += [
        Line2D([], [], color="black", ls="-", marker="o", label="measured round (t_round_s)"),
        Line2D([], [], color="black", ls=":", marker="s", label="measured device phase (t_devices_s)"),
        Line2D([], [], color="black", ls="--", marker="^", label="modelled deployment round (sim_round_s)"),
    ]
    ax.set_xscale("log")
    ax.set_yscale("log")
    counts = sorted({r["n_devices"] for r in rows})
    ax.set_xticks(counts, [f"{c:,}" for c in counts])
    ax.xaxis.set_minor_locator(NullLocator())
    # plain-number labels, dense enough that a span under a decade still gets several
    low, high = ax.get_ylim()
    subs = (1.0, 2.0, 5.0) if high / low > 10 else (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0)
    ax.yaxis.set_major_locator(LogLocator(subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("devices (log scale)")
    ax.set_ylabel("seconds per round, mean over rounds (log scale)")
    ax.set_title(f"Round latency against device count — {rows[0]['strategy']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path)
    plt.close(fig)


def table_columns(swept: list[str]) -> list[tuple[str, str, str]]:
    """(header, column, format) of the summary a terminal shows."""
    columns = [(key.rsplit(".", 1)[-1], key, "") for key in swept if key != DEVICES_KEY]
    return [
        *columns,
        ("devices", "n_devices", ","),
        ("rounds", "rounds", ""),
        ("set-up\ns", "setup_s", ".3g"),
        ("round\ns", "mean_t_round_s", ".3g"),
        ("device\ns", "mean_t_devices_s", ".3g"),
        ("distill\ns", "mean_t_distill_s", ".3g"),
        ("eval\ns", "mean_t_eval_s", ".3g"),
        ("modelled\ns", "mean_sim_round_s", ".3g"),
        ("devices\n/s", "devices_per_s", ".3g"),
        ("samples\n/s", "samples_per_s", ".3g"),
        ("memory\nMiB", "peak_memory_mb", ",.0f"),
    ]


def format_row(row: dict[str, Any], columns: list[tuple[str, str, str]]) -> list[str]:
    """A row's cells under `table_columns`, as text."""
    return [format(row[name], spec) for _, name, spec in columns]


def write_pages(rows: list[dict[str, Any]], swept: list[str], out_dir: Path) -> Path:
    """`OUT/sweep.md` (the summary table and the latency plot) and `OUT/sweep.html`, the same page in one file with
    the plot embedded; return the HTML page's path."""
    columns = table_columns(swept)
    lines = [f"# dccl-sim sweep: `{out_dir.name}`", ""]
    lines += [
        f"Strategy `{rows[0]['strategy']}`; set-up is each point's time from its start to its first round, the other "
        "seconds are means over its rounds, memory the peak over its run (every process it started included). Each "
        "point's run is in `devices=N[/KEY=VALUE...]` beside this page.",
        "",
        summary_line(rows) + ".",
        "",
    ]
    lines += markdown_table(
        [header.replace("\n", " ") for header, _, _ in columns], [format_row(r, columns) for r in rows]
    )
    lines += ["", f"![Round latency against device count]({PLOT})", ""]
    text = "\n".join(lines)
    (out_dir / "sweep.md").write_text(text)
    return write_html_page(text, out_dir, out_dir / HTML, title=f"dccl-sim sweep: {out_dir.name}")
