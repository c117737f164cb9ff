"""Where a run's files go, and the rules that keep a run from being lost or silently changed (docs/design.md §7):
a fresh run never writes over another's rounds unless asked to (`output.overwrite`), and a resume may change only
what does not change the results."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from dccl_sim.config import ConfigError, SimConfig

# where fresh runs go when output.out_dir is not set: RUNS/<time>-<strategy>, with RUNS/latest pointing at the newest
RUNS = Path("runs")
LATEST = "latest"
# the files and folders a run directory holds; anything else in a directory makes it not a run's
RUN_FILES = {
    "config.json",
    "rounds.parquet",
    "devices.parquet",
    "checkpoints",
    "report.md",
    "report.html",
    "branch.json",
    "plugins.json",
    "tracking.json",
    "tensorboard",
}
# what a run's results depend on is everything in its config except these: a resume may change them (`rounds` only
# upwards). Placement (backend, actors, devices per actor) leaves results unchanged (tests/test_runtime.py).
RESUMABLE = (
    "rounds",
    "output.",
    "runtime.address",
    "runtime.backend",
    "runtime.num_actors",
    "runtime.devices_per_actor",
)


def _is_run_file(path: Path) -> bool:
    return path.name in RUN_FILES or path.suffix == ".png" or path.name.endswith(".tmp")


def holds_results(out_dir: Path) -> bool:
    """Whether `out_dir` holds finished rounds (records or checkpoints) of a run."""
    checkpoints = out_dir / "checkpoints"
    return (out_dir / "rounds.parquet").exists() or (checkpoints.is_dir() and any(checkpoints.iterdir()))


def fresh_out_dir(config: SimConfig) -> SimConfig:
    """`config` with output.out_dir set: as given, or RUNS/<YYYYmmdd-HHMMSS>-<strategy> (a new folder each run)."""
    if config.output.out_dir is not None:
        return config
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{config.strategy.replace(':', '.')}"
    out_dir = RUNS / name
    suffix = 1
    while out_dir.exists():
        suffix += 1
        out_dir = RUNS / f"{name}-{suffix}"
    return config.model_copy(update={"output": config.output.model_copy(update={"out_dir": out_dir})})


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Raise what `claim` would refuse, and a folder this process cannot write in, changing nothing: a run checks this
    before any heavy work, and claims the folder only once its dataset is ready."""
    for parent in (out_dir, *out_dir.parents):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"output directory {out_dir}: {parent} is a file, not a folder")
    if out_dir.exists():
        foreign = sorted(p.name for p in out_dir.iterdir() if not _is_run_file(p))
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ConfigError(
                f"output directory {out_dir} holds files that are not a run's ({shown}); choose a new one"
            )
        if holds_results(out_dir) and not overwrite:
            raise ConfigError(
                f"output directory {out_dir} already holds a run; continue it with `dccl-sim run --resume {out_dir}`, "
                "replace it with --overwrite (output.overwrite=true), or choose another --out"
            )
    # permissions alone do not say it (root ignores them, a read-only mount does not), so try: make and remove a folder
    # where the run's would go
    nearest = next(folder for folder in (out_dir, *out_dir.parents) if folder.exists())
    try:
        tempfile.TemporaryDirectory(dir=nearest, prefix=".dccl-sim-write-test-").cleanup()
    except OSError as error:
        raise ConfigError(
            f"output directory {out_dir}: cannot write in {nearest} ({error.strerror}); choose another --out"
        ) from None


def claim(out_dir: Path, overwrite: bool) -> None:
    """Make `out_dir` ready for a fresh run: refuse a path below a file, a folder holding other files than a run's,
    a run's finished rounds unless `overwrite` (which clears the folder), and a place this process cannot write in. A
    folder holding only a run's config.json (a run that never finished a round) is taken over: nothing is lost."""
    check_out_dir(out_dir, overwrite)
    if out_dir.exists():
        shutil.rmtree(out_dir)


def point_latest(out_dir: Path) -> None:
    """RUNS/latest → out_dir, when out_dir is a fresh run's folder under RUNS (replaced atomically)."""
    if out_dir.parent != RUNS or out_dir.name == LATEST:
        return
    link = RUNS / LATEST
    if link.exists() and not link.is_symlink():
        return  # a folder of an older version's default: left alone
    temp = RUNS / f".{LATEST}.{os.getpid()}.tmp"
    temp.unlink(missing_ok=True)
    temp.symlink_to(out_dir.name)
    temp.replace(link)


def flatten_settings(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict of settings as one level of dotted keys (`device.lr`); an empty section stays a value."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= flatten_settings(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def changed_settings(saved: SimConfig, config: SimConfig) -> dict[str, tuple[Any, Any]]:
    """Every setting (dotted key) whose value in `config` differs from the saved config's: key → (saved, now). A
    setting newer than the saved file has its default there."""
    before, after = (flatten_settings(json.loads(c.to_json())) for c in (saved, config))
    keys = sorted(set(before) | set(after))
    return {key: (before.get(key), after.get(key)) for key in keys if before.get(key) != after.get(key)}


def check_resume(run_dir: Path, saved: SimConfig, config: SimConfig, finished: int) -> None:
    """Refuse a resume that would change what the finished rounds mean, or drop some of them."""
    changed = {key: values for key, values in changed_settings(saved, config).items() if not key.startswith(RESUMABLE)}
    if changed:
        listed = "; ".join(f"{key}: {old!r} → {new!r}" for key, (old, new) in changed.items())
        raise ConfigError(
            f"--resume {run_dir}: these settings would change what its finished rounds mean: {listed}. A resume may "
            "change only rounds (to extend), output.* and where it runs (runtime.address, backend, num_actors, "
            "devices_per_actor); to continue from its checkpoint under other settings, add --branch NEW_DIR"
        )
    if config.rounds < finished:
        raise ConfigError(
            f"--resume {run_dir}: it has finished {finished} rounds; rounds={config.rounds} would drop some of them"
        )


def plugin_sources(config: SimConfig) -> dict[str, str]:
    """A digest of the source file of each user plug-in (`module:Attribute`) the run names: setting → digest.
    Built-ins are part of dccl-sim itself and are not listed."""
    from dccl_sim import plugins

    named = {"strategy": (plugins.STRATEGY, config.strategy), "model.name": (plugins.MODEL, config.model.name)}
    named["data.source"] = (plugins.SOURCE, config.data.source)
    out = {}
    for key, (kind, spec) in named.items():
        if plugins.is_reference(spec):
            source = inspect.getsourcefile(plugins.resolve(kind, spec))
            out[key] = f"{spec} {hashlib.sha256(Path(source).read_bytes()).hexdigest()[:16]}" if source else spec
    return out


def check_plugins(run_dir: Path, config: SimConfig) -> None:
    """Refuse to resume a run whose plug-ins' source changed since it was made (plugins.json)."""
    saved_file = run_dir / "plugins.json"
    if not saved_file.is_file():
        return
    saved, now = json.loads(saved_file.read_text()), plugin_sources(config)
    changed = sorted(key for key in set(saved) | set(now) if saved.get(key) != now.get(key))
    if changed:
        raise ConfigError(
            f"--resume {run_dir}: the plug-in source of {', '.join(changed)} changed since the run was made; its "
            "finished rounds came from the old code. Continue under the new code with --branch NEW_DIR"
        )


def branch(run_dir: Path, new_dir: Path, last_round: int) -> None:
    """Copy a run's records and its checkpoint of `last_round` into `new_dir` (which must be new), noting where
    they came from in branch.json."""
    claim(new_dir, overwrite=False)
    (new_dir / "checkpoints").mkdir(parents=True)
    for name in ("rounds.parquet", "devices.parquet"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, new_dir / name)
    checkpoint = f"round-{last_round:04d}.pt"
    shutil.copy2(run_dir / "checkpoints" / checkpoint, new_dir / "checkpoints" / checkpoint)
    source = {"branched_from": str(run_dir.resolve()), "after_round": last_round}
    (new_dir / "branch.json").write_text(json.dumps(source, indent=1) + "\n")
