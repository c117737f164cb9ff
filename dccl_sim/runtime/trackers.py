"""Experiment trackers (`output.tracker`): observers that mirror a run into MLflow or TensorBoard (README, "Tracking").

Each logs the resolved config as parameters (one per dotted key) and every round's record (the numeric columns of
rounds.parquet) as metrics with the round as step; MLflow also stores the run directory's records as artifacts at
the end. The packages are optional extras, imported by `make_tracker` before any data is prepared or Ray started, so
a missing one fails at once. A resumed run continues its tracked run and logs only the rounds that run lacks.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dccl_sim.config import ConfigError, SimConfig
from dccl_sim.runtime.observers import Observer
from dccl_sim.runtime.records import RoundRecord, write_atomically
from dccl_sim.runtime.run_dir import flatten_settings

if TYPE_CHECKING:
    from mlflow.entities import Metric, Run

    from dccl_sim.runtime.driver import RunState

# where a run directory keeps the identity of its MLflow run, so that `--resume` continues that run
TRACKING_FILE = "tracking.json"
# the run directory's folder of TensorBoard event files
TENSORBOARD_DIR = "tensorboard"
# the metric whose history tells which rounds an MLflow run already holds: every round logs it
ROUND_TIME = "t_round_s"
# checkpoints are the run's resume state (and grow with the number of devices), tracking.json names the MLflow run
# itself; the records are the results
NOT_ARTIFACTS = ("checkpoints", TRACKING_FILE)
# MLflow names may hold letters, digits, `_ - . / ` and spaces only (`:` not on Windows)
_NOT_IN_MLFLOW_NAMES = re.compile(r"[^\w\-./ ]")


def config_params(config: SimConfig) -> dict[str, bool | int | float | str]:
    """The resolved config as parameters, one per setting under its dotted key (`device.lr`); a value that is no
    number, flag or string (a list, None) as its JSON text, as config.json holds it."""
    flat = flatten_settings(json.loads(config.to_json()))
    scalar = bool | int | float | str
    return {key: value if isinstance(value, scalar) else json.dumps(value) for key, value in flat.items()}


def round_metrics(record: RoundRecord) -> dict[str, float]:
    """A round's record as metrics: every numeric column of rounds.parquet except `round` (the step), flags as 0/1."""
    values = record.model_dump()
    return {name: float(value) for name, value in values.items() if name != "round" and isinstance(value, int | float)}


def mlflow_name(column: str) -> str:
    """The MLflow metric name of a rounds.parquet column: `device_hr@10` → `device_hr_at_10` (MLflow allows no `@`),
    any other character MLflow refuses → `_`."""
    return _NOT_IN_MLFLOW_NAMES.sub("_", column.replace("@", "_at_"))


def make_tracker(config: SimConfig, finished: Sequence[RoundRecord] = ()) -> Observer | None:
    """The observer `output.tracker` names (None for `none`), with its package imported and (MLflow) its tracking
    store opened now, so that a missing package or an unusable store is a one-line ConfigError before any data is
    prepared. `finished`: the rounds a resumed run already holds."""
    kind = config.output.tracker
    if kind == "none":
        return None
    try:
        return MlflowTracker(config, finished) if kind == "mlflow" else TensorBoardTracker(finished)
    except ImportError as error:
        raise ConfigError(
            f"output.tracker = {kind} needs {error.name or kind}, which is not installed: "
            f"pip install 'dccl-sim[{kind}]'"
        ) from None


class MlflowTracker(Observer):
    """One MLflow run per run directory, named after it, in the experiment `output.tracker_experiment`, in the store
    MLflow itself chooses: `MLFLOW_TRACKING_URI`, else MLflow's default (MLflow 3: `sqlite:///mlflow.db` in the
    working directory, or `./mlruns` where that already holds runs), so `mlflow ui` started there shows it."""

    def __init__(self, config: SimConfig, finished: Sequence[RoundRecord]) -> None:
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.finished = list(finished)
        self.run_id: str | None = None
        try:
            self.client = MlflowClient()
            name = config.output.tracker_experiment
            experiment = self.client.get_experiment_by_name(name)
            self.experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        except MlflowException as error:
            first_line = error.message.strip().splitlines()[0]
            raise ConfigError(
                f"output.tracker = mlflow: MLflow cannot open the tracking store {mlflow.get_tracking_uri()} "
                f"({first_line}); set MLFLOW_TRACKING_URI, or pip install 'dccl-sim[mlflow]' for the full MLflow"
            ) from None

    def on_start(self, config: SimConfig, num_devices: int, num_packs: int, first_round: int) -> None:
        from mlflow.entities import Param

        self.config, self.out_dir = config, Path(config.output.out_dir)
        run = self._continued_run()
        if run is None:
            run = self.client.create_run(self.experiment_id, run_name=self.out_dir.resolve().name)
            logged_params, logged_rounds = {}, set()
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
            logged_params = run.data.params
            logged_rounds = {m.step for m in self.client.get_metric_history(run.info.run_id, ROUND_TIME)}
        self.run_id = run.info.run_id
        saved = {"tracking_uri": self.client.tracking_uri, "run_id": self.run_id}
        write_atomically(self.out_dir / TRACKING_FILE, json.dumps({"mlflow": saved}, indent=1).encode())
        # MLflow parameters cannot change: a resume that extends `rounds` keeps the first value (the artifact
        # config.json holds the new one); settings the run lacks (new in this version) are added
        params = [Param(key, str(value)) for key, value in config_params(config).items() if key not in logged_params]
        missing = [metric for r in self.finished if r.round not in logged_rounds for metric in self._metrics(r)]
        self.client.log_batch(self.run_id, metrics=missing, params=params)

    def _continued_run(self) -> Run | None:
        """The MLflow run this run directory was tracked in, when it is in this store and not deleted."""
        from mlflow.exceptions import MlflowException

        path = self.out_dir / TRACKING_FILE
        try:
            saved = json.loads(path.read_text())["mlflow"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # never tracked in MLflow (or the file is damaged): a new run
        if saved.get("tracking_uri") != self.client.tracking_uri or not isinstance(saved.get("run_id"), str):
            return None  # tracked in another store: a new run in this one
        try:
            run = self.client.get_run(saved["run_id"])
        except MlflowException:
            return None
        return run if run.info.lifecycle_stage == "active" else None

    def _metrics(self, record: RoundRecord) -> list[Metric]:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        return [Metric(mlflow_name(n), value, now, record.round) for n, value in round_metrics(record).items()]

    def on_round(self, record: RoundRecord, state: RunState, cloud_state: dict) -> None:
        self.client.log_batch(self.run_id, metrics=self._metrics(record))

    def on_end(self, state: RunState) -> None:
        if self.run_id is None:
            return
        for path in sorted(self.out_dir.iterdir()):
            if path.name in NOT_ARTIFACTS or path.name.endswith(".tmp"):
                continue
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), path.name)
            else:
                self.client.log_artifact(self.run_id, str(path))
        # a run stopped before its last round (interrupted, or failed) is KILLED: `--resume` reopens it
        self.client.set_terminated(self.run_id, "FINISHED" if state.next_round >= self.config.rounds else "KILLED")


class TensorBoardTracker(Observer):
    """Event files in the run directory's `tensorboard/` folder: each round's record as scalars (float64), the
    config as hyper-parameters (TensorBoard's HParams tab). `tensorboard --logdir runs` shows every run."""

    def __init__(self, finished: Sequence[RoundRecord]) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: ImportError without it
        from torch.utils.tensorboard.summary import hparams

        self.finished = list(finished)
        self.writer_class, self.hparams = SummaryWriter, hparams
        self.writer = None

    def on_start(self, config: SimConfig, num_devices: int, num_packs: int, first_round: int) -> None:
        # every writer starts a session at step 0, and TensorBoard drops all events before a later session's
        # start: a resumed run's old event files (which may hold rounds after its checkpoint, when it stopped
        # between the two) are hidden, and its finished rounds are written again
        self.writer = self.writer_class(log_dir=str(Path(config.output.out_dir) / TENSORBOARD_DIR), purge_step=0)
        # the session-start summary alone: TensorBoard then takes the metrics from the run's scalars
        _, session_start, _ = self.hparams(config_params(config), {})
        self.writer.file_writer.add_summary(session_start)
        for record in self.finished:
            self._log(record)

    def _log(self, record: RoundRecord) -> None:
        for name, value in round_metrics(record).items():
            self.writer.add_scalar(name, value, record.round, new_style=True, double_precision=True)
        self.writer.flush()  # a TensorBoard watching the run sees each round when it ends

    def on_round(self, record: RoundRecord, state: RunState, cloud_state: dict) -> None:
        self._log(record)

    def on_end(self, state: RunState) -> None:
        if self.writer is not None:
            self.writer.close()
