"""What hangs off the round loop: the run directory's records, checkpoints, and the progress display."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.status import Status
from rich.text import Text

from dccl_sim.config import SimConfig
from dccl_sim.progress import RoundEta
from dccl_sim.results import RunDirectoryError
from dccl_sim.runtime.records import RoundRecord, write_atomically, write_devices, write_rounds
from dccl_sim.runtime.run_dir import plugin_sources

if TYPE_CHECKING:
    from dccl_sim.runtime.driver import RunState

CHECKPOINTS_KEPT = 2


class Observer:
    """Hooks of the round loop; each does nothing unless overridden."""

    def on_start(self, config: SimConfig, num_devices: int, num_packs: int, first_round: int) -> None:
        """The runtime is up and the cloud is ready."""

    def on_phase(self, round_index: int, phase: str) -> None:
        """A phase of a round (or of start-up) begins."""

    def on_round(self, record: RoundRecord, state: RunState, cloud_state: dict) -> None:
        """A round finished; `state` holds every finished round, `cloud_state` what resuming after it needs."""

    def on_end(self, state: RunState) -> None:
        """All rounds are done."""


class RunDirectory(Observer):
    """Writes `config.json`, `rounds.parquet`, `devices.parquet` and a checkpoint after every round, so a stopped
    run keeps every finished round and `--resume` continues from the last one."""

    def __init__(self, out_dir: Path, config: SimConfig) -> None:
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.record_config(config)
        sources = plugin_sources(config)
        if sources:  # what a resume checks the plug-ins against
            write_atomically(out_dir / "plugins.json", json.dumps(sources, indent=1).encode())

    def record_config(self, config: SimConfig) -> None:
        """(Re)write `config.json`: at the start, and again once the run has resolved its `auto` settings."""
        self.config = config
        write_atomically(self.out_dir / "config.json", config.to_json().encode())

    def on_round(self, record: RoundRecord, state: RunState, cloud_state: dict) -> None:
        # the records first, the checkpoint last: a checkpoint is the commit point of its round, so a run killed
        # anywhere in between resumes from a checkpoint whose rounds are on disk (`resumable_checkpoint`)
        tic = time.perf_counter()
        write_devices(state.device_frames, str(self.out_dir / "devices.parquet"))
        write_rounds(state.records, str(self.out_dir / "rounds.parquet"))
        if (record.round + 1) % self.config.output.checkpoint_every == 0 or record.round + 1 == self.config.rounds:
            save_checkpoint(self.out_dir, record.round, cloud_state)
        record.t_checkpoint_s = time.perf_counter() - tic
        record.t_round_s += record.t_checkpoint_s
        write_rounds(state.records, str(self.out_dir / "rounds.parquet"))  # again, with the round's full time


def checkpoint_dir(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def save_checkpoint(out_dir: Path, round_index: int, cloud_state: dict) -> None:
    folder = checkpoint_dir(out_dir)
    folder.mkdir(exist_ok=True)
    path = folder / f"round-{round_index:04d}.pt"
    temp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save({"round": round_index, "cloud": cloud_state}, temp)
    temp.replace(path)
    for old in sorted(folder.glob("round-*.pt"))[:-CHECKPOINTS_KEPT]:
        old.unlink()


def resumable_checkpoint(out_dir: Path, finished: int) -> tuple[int, dict] | None:
    """(round, cloud state) of the newest checkpoint whose round is among the `finished` rounds on record, None if
    there is none. A checkpoint is written after its round's records, so only a run killed in between (or records
    damaged since) makes the newest one unusable; the one before it is kept for that."""
    damaged = []
    for path in sorted(checkpoint_dir(out_dir).glob("round-[0-9][0-9][0-9][0-9].pt"), reverse=True):
        if int(path.stem.split("-")[1]) >= finished:
            continue
        try:
            saved = torch.load(path, weights_only=False)
            return saved["round"], saved["cloud"]
        except Exception:
            damaged.append(path)
    if damaged:
        raise RunDirectoryError(f"{damaged[0]}: damaged, and no older checkpoint to continue from could be read")
    return None


def notify_phase(observers: Sequence[Observer], round_index: int, phase: str) -> None:
    """Tell every observer that `phase` begins (or how a set-up step is going)."""
    for observer in observers:
        observer.on_phase(round_index, phase)


class SetupProgress:
    """Turns a set-up step's counts (`dccl_sim.progress.Progress` calls) into lines with elapsed time and an ETA for
    `show`, at most one a second and always the last; the ETA assumes the rest goes at the pace so far."""

    def __init__(self, show: Callable[[str], None]) -> None:
        self.show = show
        self.stage, self.started, self.shown = "", 0.0, 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if stage != self.stage:
            self.stage, self.started, self.shown = stage, now, 0.0
        if now - self.shown < 1.0 and done < total:
            return
        self.shown = now
        elapsed = now - self.started
        eta = f"ETA {elapsed * (total - done) / done:.0f} s" if done else "ETA unknown"
        self.show(f"{stage} {done:,} of {total:,} ({elapsed:.0f} s, {eta})")


class _EtaColumn(ProgressColumn):
    """The time left of the rounds (`RoundEta`), "estimating" until the first round has been measured."""

    def __init__(self, eta: RoundEta) -> None:
        super().__init__()
        self.eta = eta

    def render(self, task: Task) -> Text:
        left = self.eta.seconds_left()
        if left is None:
            return Text("ETA estimating", style="progress.remaining")
        minutes, seconds = divmod(round(left), 60)
        return Text(f"ETA {minutes // 60}:{minutes % 60:02d}:{seconds:02d}", style="progress.remaining")


class ProgressDisplay(Observer):
    """A rich progress bar over rounds, with the current phase (the device step counting devices done), the time left
    from the rounds measured so far, and each finished round's headline numbers."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, log_path=False)  # sentences, not source-file columns
        self.eta = RoundEta()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("round {task.completed}/{task.total}"),
            TimeElapsedColumn(),
            _EtaColumn(self.eta),
            TextColumn("{task.fields[phase]}"),
            console=self.console,
            transient=False,
        )
        self.task = None
        self.status: Status | None = None
        self.step = ""

    def on_phase(self, round_index: int, phase: str) -> None:
        if self.task is not None:
            # drawn at once, so a short phase shows too (a redraw costs under a millisecond; a round has a few phases
            # and a count update per pack)
            self.progress.update(self.task, phase=phase, refresh=True)
            return
        # set-up: a line per step, and one status line (updated in place) for the step's progress
        step = phase.split(":")[0]
        if step != self.step:
            self.step = step
            self.console.log(step)
        if self.status is None:
            self.status = self.console.status(phase)
            self.status.start()
        else:
            self.status.update(phase)

    def on_start(self, config: SimConfig, num_devices: int, num_packs: int, first_round: int) -> None:
        self.console.log(
            f"{config.strategy} on {num_devices} devices in {num_packs} packs, "
            f"rounds {first_round}..{config.rounds - 1} ({config.runtime.backend} runtime)"
        )
        if self.status is not None:
            self.status.stop()
        self.eta.start(config.rounds - first_round)
        self.progress.start()
        self.task = self.progress.add_task(config.strategy, total=config.rounds, completed=first_round, phase="")

    def on_round(self, record: RoundRecord, state: RunState, cloud_state: dict) -> None:
        self.eta.round_finished()
        self.progress.update(self.task, advance=1, phase="", refresh=True)
        self.progress.console.log(record.summary())

    def on_end(self, state: RunState) -> None:
        self.close()

    def close(self) -> None:
        """Stop the status line and the progress bar (again is harmless)."""
        if self.status is not None:
            self.status.stop()
        self.progress.stop()
