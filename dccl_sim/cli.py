"""`dccl-sim run | sweep | report | data`: the command line (docs/design.md §7)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dccl_sim.config import ConfigError, SimConfig, load_config
from dccl_sim.data.raw import DataError
from dccl_sim.results import RunDirectoryError

# messages hold paths and commands to copy: a line break inside one would corrupt it, and so would reading their
# brackets (`dccl-sim[mlflow]`) as rich markup: error texts are escaped
console = Console(soft_wrap=True)


def _config(args: argparse.Namespace, extra: list[str] | None = None) -> SimConfig:
    overrides = list(args.set or []) + (extra or [])
    return load_config(args.config, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from dccl_sim.runtime.run_dir import fresh_out_dir
    from dccl_sim.runtime.session import resume_state, run

    extra = ["output.verbose=true"] if args.verbose else []
    if args.address:
        extra += [f"runtime.address={args.address}", "runtime.backend=ray"]
    if args.branch and not args.resume:
        raise ConfigError("--branch NEW_DIR continues a run given with --resume DIR")
    if args.resume:
        if args.config or args.out or args.overwrite:
            raise ConfigError("--resume continues a run with its saved config; use --set to change settings")
        config, state = resume_state(Path(args.resume), list(args.set or []) + extra, args.branch)
        if state.next_round >= config.rounds:
            console.print(
                f"{args.resume} has finished all {config.rounds} rounds; extend it with --set rounds=N "
                f"(N > {config.rounds})"
            )
            return 0
    else:
        extra += [f"output.out_dir={args.out}"] if args.out else []
        config = fresh_out_dir(_config(args, extra + (["output.overwrite=true"] if args.overwrite else [])))
        state = None
    out_dir = Path(config.output.out_dir)
    try:
        state = run(config, state)
    except KeyboardInterrupt:
        console.print(
            f"[yellow]interrupted[/]: the finished rounds are in {out_dir}; continue with "
            f"`dccl-sim run --resume {out_dir}`"
        )
        return 130
    empty = sum(record.no_device_results for record in state.records)
    console.print(
        f"[green]done[/]: {len(state.records)} rounds in {out_dir} (rounds.parquet, devices.parquet)"
        + (
            f"; [yellow]{empty} of them had no device results[/] (every sampled device unavailable, late or lost: "
            "see n_stragglers, n_failed, late_packs)"
            if empty
            else ""
        )
    )
    return 0


def _summary_table(built) -> Table:
    data = built.data
    n = np.diff(data.seq_offsets)
    positives = data.label == 1
    table = Table(title=f"dataset {built.meta.source}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("devices", f"{data.num_devices:,}")
    table.add_row("items", f"{built.meta.num_items:,}")
    table.add_row("categories", f"{built.meta.num_categories}")
    table.add_row("profile fields", ", ".join(built.meta.profile_fields) or "none")
    for split, name in enumerate(("train", "valid", "test")):
        mine = data.split == split
        table.add_row(f"{name} samples (positives)", f"{int(mine.sum()):,} ({int((mine & positives).sum()):,})")
    q = np.percentile(n, [50, 90])
    table.add_row("interactions per device", f"min {n.min()}, median {q[0]:g}, p90 {q[1]:g}, max {n.max()}")
    if built.meta.dropped_users:
        table.add_row("users left out", f"{built.meta.dropped_users:,}")
    return table


def cmd_data(args: argparse.Namespace) -> int:
    from dccl_sim.data.prepare import build, source_settings_of, write_to
    from dccl_sim.data.store import write_dataset
    from dccl_sim.runtime.observers import SetupProgress

    extra = [f"data.source={args.source}"]
    if args.path is not None:  # quoted: a path is a string, whatever YAML would make of it
        extra.append(f"data.path={json.dumps(args.path)}")
    if args.devices is not None:
        extra.append(f"data.num_devices={args.devices}")
    config = _config(args, extra)
    with console.status(f"building {args.source} samples") as status:
        built = build(config.data, config.seed, source_settings_of(config), SetupProgress(status.update))
        status.update(f"writing Parquet to {args.out}")
        if "://" in args.out:  # a pyarrow filesystem URI: written in place, meta.json last marks it complete
            write_dataset(built, args.out, SetupProgress(status.update))
        else:
            write_to(built, Path(args.out), on_progress=SetupProgress(status.update))
    console.print(_summary_table(built))
    console.print(f"written to {args.out}; use it with --set {shlex.quote('data.source=' + args.out)}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from dccl_sim import sweep

    out = args.out or Path("runs/sweep")
    devices = sweep.parse_devices(args.devices) if args.devices else None
    overrides = list(args.set or []) + (["output.overwrite=true"] if args.overwrite else [])
    overrides += ["output.verbose=true"] if args.verbose else []
    points = sweep.build_grid(devices, overrides, args.config, out)
    swept = list(points[0].values)
    how = "each in a fresh process with its own Ray" if args.isolate else "in this process, sharing one Ray"
    console.print(f"sweep: {len(points)} runs over {', '.join(swept) or 'no axis'} into {out}, {how}")

    def finished(row: dict) -> None:
        console.print(f"[green]finished[/] {row['run_dir']}: {row['wall_s']:.0f} s ({row['setup_s']:.0f} s of set-up)")

    try:
        rows = sweep.run_sweep(points, out, isolate=args.isolate, on_row=finished)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: finished points are in {out / 'sweep.parquet'}")
        return 130
    table = Table(
        title=f"sweep ({rows[0]['strategy']}): means over rounds",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    columns = sweep.table_columns(swept)
    for header, _, _ in columns:
        table.add_column(header, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*sweep.format_row(row, columns))
    console.print(table)
    console.print(sweep.summary_line(rows))
    console.print(f"written: {out / 'sweep.parquet'}, {out / sweep.PLOT}, {out / 'sweep.md'}, {out / sweep.HTML}")
    return 0


# what lives under data.cache_dir: (folder, what it holds)
CACHE_PARTS = (
    ("datasets", "built datasets (per data config, seed)"),
    ("pretrained", "pretrained clouds (per pretraining key)"),
    ("ml-100k", "the MovieLens-100K download"),
)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def cmd_cache(args: argparse.Namespace) -> int:
    """Show what dccl-sim caches under data.cache_dir, or clear parts of it."""
    import shutil

    root = _config(args).data.cache_dir.expanduser()
    chosen = [name for name, _ in CACHE_PARTS] if args.clear == ["all"] else args.clear or []
    unknown = sorted(set(chosen) - {name for name, _ in CACHE_PARTS})
    if unknown:
        raise ConfigError(f"cache --clear: unknown part {unknown[0]!r}; choose from datasets, pretrained, ml-100k, all")
    for name in chosen:
        freed = _size(root / name)
        shutil.rmtree(root / name, ignore_errors=True)
        console.print(f"cleared {root / name} ({freed / 2**20:.1f} MiB)")
    table = Table(title=f"cache {root}", box=box.SIMPLE_HEAD)
    for column in ("part", "entries", "MiB", "what"):
        table.add_column(column, justify="left" if column in ("part", "what") else "right")
    for name, what in CACHE_PARTS:
        path = root / name
        entries = len(list(path.iterdir())) if path.is_dir() else 0
        table.add_row(name, str(entries), f"{_size(path) / 2**20:.1f}", what)
    console.print(table)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dccl_sim.report import HTML, write_report
    from dccl_sim.results import RunDirectoryError

    try:
        path = write_report(args.run_dir)
    except RunDirectoryError as error:
        console.print(f"[red]error[/]: {escape(str(error))}")
        return 2
    console.print(f"written: {path} (plots beside it)\nwritten: {path.with_name(HTML)} (one file, plots embedded)")
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="dccl-sim", description="Simulate device-cloud collaborative learning on Ray.")
    commands = root.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="TOML or YAML config file")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. rounds=5")

    run = commands.add_parser("run", help="run a simulation")
    common(run)
    run.add_argument("--out", type=Path, help="run directory (default: output.out_dir)")
    run.add_argument("--address", help="join an existing Ray cluster (else RAY_ADDRESS, else embedded local Ray)")
    run.add_argument("--resume", type=Path, metavar="DIR", help="continue (or extend with --set rounds=N) a run")
    run.add_argument(
        "--branch",
        type=Path,
        metavar="NEW_DIR",
        help="with --resume: continue from the run's checkpoint into NEW_DIR, under changed settings",
    )
    run.add_argument("--overwrite", action="store_true", help="replace a run already in the output directory")
    run.add_argument("--verbose", action="store_true", help="show Ray's own log lines too (output.verbose)")
    run.set_defaults(handler=cmd_run)

    data = commands.add_parser("data", help="build a dataset directory (Parquet partitioned by device shard)")
    data.add_argument("source", help="ml100k, synthetic, movielens, recbole, table, or a module:function of yours")
    data.add_argument("path", nargs="?", help="the file or folder a source reads (movielens, recbole, table)")
    data.add_argument("--out", required=True, help="a local folder or a pyarrow filesystem URI (s3://, gs://, ...)")
    data.add_argument("--devices", type=int, help="synthetic: how many devices; real data: keep the first N users")
    common(data)
    data.set_defaults(handler=cmd_data)

    sweep = commands.add_parser("sweep", help="run one configuration at several device counts")
    sweep.add_argument("--devices", help="device counts, e.g. 10,100,1000 (sets data.num_devices)")
    common(sweep)
    sweep.add_argument("--out", type=Path, help="sweep folder (default: runs/sweep)")
    sweep.add_argument("--overwrite", action="store_true", help="replace the runs of an earlier sweep in --out")
    sweep.add_argument("--verbose", action="store_true", help="show Ray's own log lines too (output.verbose)")
    sweep.add_argument(
        "--isolate",
        action="store_true",
        help="run each point in a fresh process with its own Ray (slower; each point's own set-up and peak memory)",
    )
    sweep.set_defaults(handler=cmd_sweep)

    cache = commands.add_parser("cache", help="show (or clear) what dccl-sim caches: datasets, pretrained clouds")
    cache.add_argument("--clear", nargs="+", metavar="PART", help="clear parts: datasets, pretrained, ml-100k, or all")
    common(cache)
    cache.set_defaults(handler=cmd_cache)

    report = commands.add_parser("report", help="write report.md, report.html and plots for a run directory")
    report.add_argument("run_dir", type=Path)
    report.set_defaults(handler=cmd_report)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, DataError, RunDirectoryError) as error:
        console.print(f"[red]error[/]: {escape(str(error))}")
        return 2
    except Exception as error:
        from dccl_sim.runtime.ray_runtime import CloudWorkerLost, RuntimeStartError

        if isinstance(error, RuntimeStartError):
            console.print(f"[red]error[/]: {escape(str(error))}")
            return 2
        if isinstance(error, CloudWorkerLost):  # not bad input: the cluster lost a machine
            console.print(f"[red]error[/]: {escape(str(error))}")
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
