"""The run directory's records: one row per round (`rounds.parquet`), one per device per round (`devices.parquet`).

Column names are a public contract (README, "Outputs"). `broadcast_*` is the plain broadcast model W_t (θ̂ = 0, no
starting patch), `start_*` the model the devices started from (for dccl, W_t with its starting meta-patch θ̃),
`device_*` the personalized models, `cloud_*` the cloud model after the round's update; `tail_*` the long-tail
activity bucket (bucket 0).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError

from dccl_sim.config import SimConfig
from dccl_sim.results import RunDirectoryError, read_table

DEVICE_RECORD_COLUMNS = (
    "round",
    "device_id",
    "bucket",
    "n_train",
    "n_test",
    "start_auc",
    "device_auc",
    "cloud_auc",
    "broadcast_auc",
    "gate_passed",
    "compute_s",
    "sim_time_s",
    "straggler",
    "flops",
)


def device_ranking_columns(config: SimConfig) -> tuple[str, ...]:
    """devices.parquet's per-device ranking columns: the device's number of queries, then each model's HR and NDCG
    at `metrics.k`, sampled (`device_hr@10`) and/or full (`device_full_hr@10`) as `metrics.ranking` says; pooled
    per activity bucket by `report.bucket_ranking`."""
    k, ranking = config.metrics.k, config.metrics.ranking
    kinds = [kind for kind, wanted in (("", ranking != "full"), ("full_", ranking != "sampled")) if wanted]
    names = [f"{model}_{kind}{metric}@{k}" for kind in kinds for model in MODELS for metric in ("hr", "ndcg")]
    return ("n_queries", *names)


def device_record_columns(strategy: type, config: SimConfig) -> tuple[str, ...]:
    """devices.parquet's columns for a run: every strategy's, the ranking columns, then the strategy's own
    `device_columns`."""
    return (*DEVICE_RECORD_COLUMNS, *device_ranking_columns(config), *strategy.device_columns)


class RoundRecord(BaseModel):
    """One round of a run: the columns every strategy records; the ranking metrics at every cut-off
    (`<model>_hr@K`, `<model>_ndcg@K`, `<model>_mrr`), a strategy's own columns (`Strategy.round_columns`) and its
    cloud step's statistics (`cloud_<key>`) come as extra fields. `*_hr10` and `*_ndcg10` are the names from before
    `metrics.ks`, kept as aliases for one release: HR and NDCG at `metrics.k`."""

    model_config = ConfigDict(extra="allow")

    round: int
    strategy: str
    n_devices: int
    n_participants: int
    n_stragglers: int
    n_failed: int
    start_gauc: float
    tail_start_gauc: float
    start_hr10: float
    start_ndcg10: float
    device_gauc: float
    tail_device_gauc: float
    device_hr10: float
    device_ndcg10: float
    tail_device_hr10: float
    tail_device_ndcg10: float
    cloud_auc: float
    cloud_gauc: float
    cloud_hr10: float
    cloud_ndcg10: float
    tail_cloud_gauc: float
    tail_cloud_hr10: float
    tail_cloud_ndcg10: float
    gate_pass_rate: float
    t_broadcast_s: float
    t_devices_s: float
    t_gather_s: float
    t_distill_s: float
    t_eval_s: float
    t_checkpoint_s: float
    t_round_s: float
    sim_round_s: float
    device_compute_min_s: float
    device_compute_p50_s: float
    device_compute_p95_s: float
    device_compute_max_s: float
    broadcast_bytes: int
    upload_bytes_per_device: int
    download_bytes_per_device: int
    # the plain broadcast model over the participants with results (NaN in runs written before it was recorded)
    broadcast_gauc: float = math.nan
    tail_broadcast_gauc: float = math.nan
    # PSS of the driver and the processes it started (an embedded Ray's workers included); NaN in older runs
    peak_memory_mb: float = math.nan
    # no device's result came back (every sampled device unavailable, late or lost): the device metrics are NaN and
    # the cloud updated on nothing; False in older runs
    no_device_results: bool = False
    # packs dropped by the wall-clock deadline runtime.deadline_s
    late_packs: int = 0
    # the first round of a run (or of a resumed run): seconds from the start of the run to the start of this round
    # (data, actors, pretraining, the broadcast model's evaluation); NaN for the other rounds and in older runs
    t_setup_s: float = math.nan
    # participants lost with the packs whose actor died (`n_failed` packs: a process or a node gone); they are among
    # `n_stragglers`, whose results did not come back
    failed_devices: int = 0

    def summary(self) -> str:
        def show(value: float) -> str:
            return "  —  " if math.isnan(value) else f"{value:.4f}"

        per_pack = (
            f"; {self.late_packs} packs missed runtime.deadline_s (a wall-clock deadline applies per pack: a late "
            "pack's devices are all dropped)"
            if self.late_packs
            else ""
        )
        if self.n_failed:
            per_pack += f"; {self.n_failed} packs lost ({self.failed_devices} devices) with their process or node"
        if self.no_device_results:
            return (
                f"round {self.round}: NO DEVICE RESULTS: {self.n_stragglers} sampled devices dropped as late, "
                f"{self.n_failed} packs lost{per_pack}; cloud {show(self.cloud_gauc)}, {self.t_round_s:.1f} s"
            )
        return (
            f"round {self.round}: GAUC broadcast {show(self.broadcast_gauc)} → device {show(self.device_gauc)}, "
            f"cloud {show(self.cloud_gauc)} (tail {show(self.tail_cloud_gauc)}); "
            f"{self.n_participants} devices, {self.n_stragglers} stragglers, {self.t_round_s:.1f} s"
            + ("" if math.isnan(self.t_setup_s) else f" after {self.t_setup_s:.0f} s of set-up")
            + per_pack
        )


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`: a crash leaves the old file or the
    new one, never half of one."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_bytes(data)
    temp.replace(path)


def _write_table(table: pa.Table, path: str) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomically(Path(path), sink.getvalue().to_pybytes())


def write_rounds(records: list[RoundRecord], path: str) -> None:
    rows = [record.model_dump() for record in records]
    _write_table(pa.Table.from_pylist(rows), path)


def read_rounds(path: str) -> list[RoundRecord]:
    """The rounds of rounds.parquet; RunDirectoryError when the file is damaged."""
    try:
        return [RoundRecord.model_validate(row) for row in read_table(Path(path)).to_pylist()]
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise RunDirectoryError(f"{path}: damaged, {where}: {first['msg']}") from None


def write_devices(frames: list[dict[str, np.ndarray]], path: str) -> None:
    """One row per device per round; the columns are the newest frame's (a resumed run's rows read back with the
    same names)."""
    if not frames:
        return
    table = pa.table({name: np.concatenate([f[name] for f in frames]) for name in frames[-1]})
    _write_table(table, path)


# the models every round evaluates, in column order
MODELS = ("broadcast", "start", "device", "cloud")
# columns added after the first release, and the value rows written before them get, so older runs resume (and
# every per-device ranking column, NaN)
LATER_DEVICE_COLUMNS = {"flops": np.float64(np.nan), "broadcast_auc": np.float64(np.nan), "n_queries": np.int64(0)}


def read_devices_records(path: str, names: tuple[str, ...] = DEVICE_RECORD_COLUMNS) -> list[dict[str, np.ndarray]]:
    """The rows of devices.parquet as one dict of columns per round, with the given column names (a column the
    file lacks gets its value from `LATER_DEVICE_COLUMNS`)."""
    required = [name for name in DEVICE_RECORD_COLUMNS if name not in LATER_DEVICE_COLUMNS]
    table = read_table(Path(path), required)
    rounds = table["round"].to_numpy()
    columns = {
        name: table[name].to_numpy()
        if name in table.column_names
        else np.full(
            len(rounds), LATER_DEVICE_COLUMNS.get(name, np.float64(np.nan))
        )  # the value's dtype is the column's
        for name in names
    }
    return [{name: values[rounds == r] for name, values in columns.items()} for r in np.unique(rounds)]
