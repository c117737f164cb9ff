"""Start, resume and finish a run directory: the glue between the CLI and the round loop."""

from __future__ import annotations

import json
from pathlib import Path

from dccl_sim.config import ConfigError, SimConfig, apply_overrides, build_config
from dccl_sim.data.prepare import prepare_run_dataset
from dccl_sim.data.store import read_meta
from dccl_sim.plugins import STRATEGY, resolve
from dccl_sim.runtime.base import Runtime
from dccl_sim.runtime.driver import Dataset, RunState, run_rounds
from dccl_sim.runtime.local import LocalRuntime
from dccl_sim.runtime.observers import Observer, ProgressDisplay, RunDirectory, latest_checkpoint
from dccl_sim.runtime.records import device_record_columns, read_devices_records, read_rounds


def make_runtime(config: SimConfig) -> Runtime:
    if config.runtime.backend == "local":
        return LocalRuntime()
    from dccl_sim.runtime.ray_runtime import RayRuntime  # Ray only when asked for

    return RayRuntime(address=config.runtime.address)


def resume_state(run_dir: Path, overrides: list[str]) -> tuple[SimConfig, RunState]:
    """The config saved in `run_dir` (plus overrides, e.g. `rounds=N` to extend) and the rounds it finished up to
    its last checkpoint."""
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"--resume {run_dir}: not a run directory (no config.json)")
    config = build_config(apply_overrides(json.loads(config_file.read_text()), overrides))
    config = config.model_copy(update={"output": config.output.model_copy(update={"out_dir": run_dir})})
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return config, RunState()
    last_round, cloud_state = checkpoint
    records = [r for r in read_rounds(str(run_dir / "rounds.parquet")) if r.round <= last_round]
    names = device_record_columns(resolve(STRATEGY, config.strategy), config)
    frames = [f for f in read_devices_records(str(run_dir / "devices.parquet"), names) if f["round"][0] <= last_round]
    if len(records) != last_round + 1:
        raise ConfigError(f"--resume {run_dir}: rounds.parquet does not match checkpoint of round {last_round}")
    return config, RunState(records=records, device_frames=frames, cloud_state=cloud_state)


def run(
    config: SimConfig,
    state: RunState | None = None,
    runtime: Runtime | None = None,
    extra_observers: list[Observer] | None = None,
) -> RunState:
    """Run a simulation into `config.output.out_dir`, writing records and checkpoints after every round."""
    runtime = runtime or make_runtime(config)
    observers: list[Observer] = [RunDirectory(Path(config.output.out_dir), config)]
    if config.output.progress:
        observers.append(ProgressDisplay())
    observers += extra_observers or []
    try:
        for observer in observers:
            observer.on_phase(state.next_round if state else 0, "preparing data")
        root = prepare_run_dataset(config)
        dataset = Dataset(root, read_meta(root).num_devices)
        return run_rounds(config, runtime, dataset, observers, state)
    finally:
        runtime.shutdown()
