"""Start, resume and finish a run directory: the glue between the CLI and the round loop."""

from __future__ import annotations

import functools
import time
from pathlib import Path

from dccl_sim import sizing
from dccl_sim.config import ConfigError, SimConfig, apply_overrides, build_config
from dccl_sim.data.prepare import check_dataset, prepare_run_dataset
from dccl_sim.data.store import read_meta
from dccl_sim.hosts.loading import device_work
from dccl_sim.plugins import STRATEGY, resolve
from dccl_sim.results import read_config
from dccl_sim.runtime.base import Runtime
from dccl_sim.runtime.driver import Dataset, RunState, run_rounds
from dccl_sim.runtime.local import LocalRuntime
from dccl_sim.runtime.observers import (
    Observer,
    ProgressDisplay,
    RunDirectory,
    SetupProgress,
    notify_phase,
    resumable_checkpoint,
)
from dccl_sim.runtime.records import device_record_columns, read_devices_records, read_rounds
from dccl_sim.runtime.run_dir import (
    branch,
    check_out_dir,
    check_plugins,
    check_resume,
    claim,
    fresh_out_dir,
    point_latest,
)
from dccl_sim.runtime.trackers import make_tracker


def make_runtime(config: SimConfig, keep_ray: bool = False) -> Runtime:
    """The runtime `config` asks for; `keep_ray`: a Ray one leaves Ray running after the run (see `RayRuntime`)."""
    if config.runtime.backend == "local":
        return LocalRuntime()
    from dccl_sim.runtime.ray_runtime import RayRuntime  # Ray only when asked for

    return RayRuntime(address=config.runtime.address, verbose=config.output.verbose, keep_ray=keep_ray)


def resume_state(run_dir: Path, overrides: list[str], branch_to: Path | None = None) -> tuple[SimConfig, RunState]:
    """The config saved in `run_dir` (plus overrides, e.g. `rounds=N` to extend) and the rounds it finished up to
    its last checkpoint. Overrides that would change what the finished rounds mean are refused
    (`run_dir.check_resume`) unless `branch_to`: then the records and the checkpoint are copied there and the run
    continues in that new directory under the changed settings."""
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"--resume {run_dir}: not a run directory (no config.json)")
    saved = read_config(run_dir)
    config = build_config(apply_overrides(saved, overrides))
    out_dir = run_dir if branch_to is None else branch_to
    config = config.model_copy(update={"output": config.output.model_copy(update={"out_dir": out_dir})})
    rounds_file, devices_file = run_dir / "rounds.parquet", run_dir / "devices.parquet"
    on_record = read_rounds(str(rounds_file)) if rounds_file.is_file() and devices_file.is_file() else []
    checkpoint = resumable_checkpoint(run_dir, len(on_record))
    finished = 0 if checkpoint is None else checkpoint[0] + 1
    if branch_to is None:
        check_resume(run_dir, build_config(saved), config, finished)
        check_plugins(run_dir, config)
    elif config.rounds < finished:
        raise ConfigError(f"--branch: {run_dir} has finished {finished} rounds; rounds={config.rounds} is fewer")
    if checkpoint is None:
        if branch_to is not None:
            raise ConfigError(f"--branch: {run_dir} has no finished round to continue from")
        return config, RunState()
    last_round, cloud_state = checkpoint
    records = [r for r in on_record if r.round <= last_round]
    names = device_record_columns(resolve(STRATEGY, config.strategy), config)
    frames = [f for f in read_devices_records(str(devices_file), names) if f["round"][0] <= last_round]
    if len(records) != last_round + 1:
        raise ConfigError(f"--resume {run_dir}: rounds.parquet does not match checkpoint of round {last_round}")
    if branch_to is not None:
        branch(run_dir, branch_to, last_round)
    return config, RunState(records=records, device_frames=frames, cloud_state=cloud_state)


def run(
    config: SimConfig,
    state: RunState | None = None,
    runtime: Runtime | None = None,
    extra_observers: list[Observer] | None = None,
) -> RunState:
    """Run a simulation into `config.output.out_dir` (a new folder under runs/ when unset; `state.out_dir` says
    which), writing records and checkpoints after every round. A fresh run (no `state`) does not write over another
    run's rounds unless `output.overwrite`; a resumed run that has finished every round returns at once.

    What would stop the run (no Ray cluster at the address, a built dataset that cannot be read, an output directory
    that cannot be used) is found first, in seconds; the dataset is prepared next, and only then is the output
    directory claimed (so a dataset problem never clears an old run under `output.overwrite`) and the runtime started.
    """
    started = time.perf_counter()
    config = sizing.before_data(config)
    if state is not None and state.next_round >= config.rounds:
        if runtime is not None:
            runtime.shutdown()
        state.out_dir = Path(config.output.out_dir)
        return state
    # first, so that a tracker's missing package stops the run before a folder is cleared or data prepared
    tracker = make_tracker(config, state.records if state else ())
    if state is None:
        config = fresh_out_dir(config)
    out_dir = Path(config.output.out_dir)
    runtime = runtime or make_runtime(config)
    display = None
    try:
        runtime.check()
        check_dataset(config.data)
        if state is None:
            check_out_dir(out_dir, config.output.overwrite)
        display = ProgressDisplay() if config.output.progress else None
        observers: list[Observer] = [display] if display is not None else []
        observers += extra_observers or []
        first_round = state.next_round if state else 0
        notify_phase(observers, first_round, "preparing data")
        root = prepare_run_dataset(config, SetupProgress(functools.partial(notify_phase, observers, first_round)))
        if state is None:
            claim(out_dir, config.output.overwrite)
        directory = RunDirectory(out_dir, config)
        point_latest(out_dir)
        # first: a round is on disk before any other observer hears of it; then the tracker, as the directory's
        # on_round completes each record (checkpoint and round times)
        observers[:0] = [directory, *([tracker] if tracker else [])]
        num_devices = read_meta(root).num_devices
        config = runtime.resolve(sizing.for_dataset(config, num_devices))
        directory.record_config(config)  # what `auto` became
        dataset = Dataset(root, num_devices, device_work(config, root))
        state = run_rounds(config, runtime, dataset, observers, state, started)
        state.out_dir = out_dir
        return state
    finally:
        if display is not None:  # a failure before the rounds began leaves the set-up status line running
            display.close()
        runtime.shutdown()
