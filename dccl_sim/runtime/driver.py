"""The round loop, written once against `Runtime` (docs/design.md §4–§6).

Per round: sample participants (seeded, minus devices the deployment model makes unavailable or late), have the
cloud broadcast once, run the device packs, update the cloud with what came back, evaluate, record. The loop
only moves data and times phases; observers write records and checkpoints and show progress.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dccl_sim import metrics
from dccl_sim.algorithms.protocol import concat_columns, result_columns
from dccl_sim.config import SimConfig
from dccl_sim.plugins import STRATEGY, resolve
from dccl_sim.runtime import latency
from dccl_sim.runtime.base import Runtime
from dccl_sim.runtime.memory import MemoryMonitor
from dccl_sim.runtime.observers import Observer, SetupProgress, notify_phase
from dccl_sim.runtime.placement import plan_packs
from dccl_sim.runtime.records import RoundRecord, device_ranking_columns
from dccl_sim.seeding import seeded_generator, stream_tag
from dccl_sim.strategies.base import Strategy


@dataclass
class RunState:
    """Finished rounds with their per-device rows, and (when resuming) the cloud state to continue from."""

    records: list[RoundRecord] = field(default_factory=list)
    device_frames: list[dict[str, np.ndarray]] = field(default_factory=list)
    cloud_state: dict | None = None
    out_dir: Path | None = None  # the run directory, once the run has one
    # whether this run's pretrained cloud came from the cache (`CloudHost.pretrain`); None when resumed (no pretraining)
    pretrain_cached: bool | None = None

    @property
    def next_round(self) -> int:
        return len(self.records)


def sample_participants(seed: int, round_index: int, num_devices: int, fraction: float) -> np.ndarray:
    """The round's participants: a seeded sample of round(fraction · N) devices (at least one), sorted."""
    if fraction >= 1.0:
        return np.arange(num_devices, dtype=np.int64)
    count = max(1, round(fraction * num_devices))
    rng = seeded_generator(seed, round_index, stream_tag("participants"))
    return np.sort(rng.choice(num_devices, size=count, replace=False)).astype(np.int64)


def _spread(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return dict.fromkeys(("min", "p50", "p95", "max"), math.nan)
    p50, p95 = np.percentile(values, [50, 95])
    return {"min": float(values.min()), "p50": float(p50), "p95": float(p95), "max": float(values.max())}


class _Clock:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def measure(self, name: str, start: float) -> None:
        self.times[name] = time.perf_counter() - start


class _DevicesDone:
    """The device phase's progress: how many of the round's participants have their results back, told to the
    observers as the phase "device step: D of N devices done" when it starts and as each pack's results arrive."""

    def __init__(self, observers: Sequence[Observer], round_index: int, participants_of_pack: np.ndarray) -> None:
        self.observers, self.round_index, self.participants_of_pack = observers, round_index, participants_of_pack
        self.done, self.total = 0, int(participants_of_pack.sum())
        self._show()

    def __call__(self, pack: int) -> None:
        self.done += int(self.participants_of_pack[pack])
        self._show()

    def _show(self) -> None:
        notify_phase(self.observers, self.round_index, f"device step: {self.done:,} of {self.total:,} devices done")


@dataclass(frozen=True, eq=False)
class Dataset:
    """The prepared dataset a run reads: its directory, how many devices it holds and, where known, the samples each
    one's host will hold (`hosts.loading.device_work`), which the packs are balanced on."""

    root: str
    num_devices: int
    device_work: np.ndarray | None = None


def run_rounds(
    config: SimConfig,
    runtime: Runtime,
    dataset: Dataset,
    observers: Sequence[Observer] = (),
    state: RunState | None = None,
    started: float | None = None,
) -> RunState:
    """Run rounds `state.next_round .. config.rounds - 1` and return the state with every finished round. `started`
    (a `time.perf_counter()`): when the run began, for the first round's `t_setup_s` (default: now)."""
    state = state or RunState()
    started = time.perf_counter() if started is None else started
    try:
        with MemoryMonitor() as memory:
            _run(config, runtime, dataset, observers, state, memory, started)
    finally:
        for observer in observers:
            observer.on_end(state)
    return state


def _run(
    config: SimConfig,
    runtime: Runtime,
    dataset: Dataset,
    observers: Sequence[Observer],
    state: RunState,
    memory: MemoryMonitor,
    started: float,
) -> None:
    strategy: Strategy = resolve(STRATEGY, config.strategy)(config)
    num_devices = dataset.num_devices
    packs = plan_packs(num_devices, config.runtime, runtime.device_cpus(config), dataset.device_work)
    notify_phase(observers, state.next_round, f"starting the cloud and {len(packs)} device packs")
    runtime.start(config, dataset.root, packs)
    cloud = runtime.cloud
    if state.cloud_state is None:
        notify_phase(observers, state.next_round, "pretraining the cloud model")
        progress = SetupProgress(functools.partial(notify_phase, observers, state.next_round))
        pretrained = cloud.pretrain(str(config.data.cache_dir.expanduser() / "pretrained"), progress)
        state.pretrain_cached = bool(pretrained["pretrain_cached"])
    else:
        cloud.load_state(state.cloud_state)
    # the plain broadcast model W_t (θ̂ = 0, no starting patch) is the cloud model as the previous round left it:
    # its evaluation is the next round's baseline, so each model is scored once
    notify_phase(observers, state.next_round, "evaluating the broadcast model")
    broadcast_evaluation = cloud.evaluate()
    bucket_of_device = cloud.device_info().bucket
    cost = cloud.model_cost()
    pack_of_device = np.concatenate([np.full(len(p), i) for i, p in enumerate(packs)])
    for observer in observers:
        observer.on_start(config, num_devices, len(packs), state.next_round)

    memory.take_peak()  # setup and pretraining are not part of round 0's peak
    setup_s, first_round = time.perf_counter() - started, state.next_round
    for t in range(first_round, config.rounds):
        round_start = time.perf_counter()
        clock = _Clock()
        # who takes part: seeded sample, minus unavailable devices, minus those the deployment model makes late
        profiles = latency.draw_profiles(config.latency, config.seed, np.arange(num_devices), t)
        sampled = sample_participants(config.seed, t, num_devices, config.runtime.participation)
        sampled = sampled[profiles.available[sampled]]
        counts = cloud.device_counts(t)
        planned = strategy.device_cost(cost, counts["n_local"][sampled], counts["n_eval"][sampled])
        planned_times = latency.device_times(
            profiles.subset(sampled), planned.flops, planned.download_bytes, planned.upload_bytes
        )
        deadline = config.latency.deadline_s
        late = planned_times > deadline if deadline is not None else np.zeros(len(sampled), dtype=bool)
        participants = sampled[~late]

        notify_phase(observers, t, "broadcast")
        tic = time.perf_counter()
        handle = runtime.broadcast(t, participants)
        clock.measure("t_broadcast_s", tic)

        tic = time.perf_counter()
        active_packs = sorted(set(pack_of_device[participants].tolist()))
        devices_done = _DevicesDone(observers, t, np.bincount(pack_of_device[participants], minlength=len(packs)))
        phase = runtime.run_devices(handle, active_packs, config.runtime.deadline_s, devices_done)
        clock.measure("t_devices_s", tic)

        notify_phase(observers, t, "cloud update")
        tic = time.perf_counter()
        cloud_stats = cloud.update(t, participants, phase.results)
        clock.measure("t_distill_s", tic)

        notify_phase(observers, t, "evaluation")
        tic = time.perf_counter()
        evaluation: metrics.Evaluation = cloud.evaluate()
        clock.measure("t_eval_s", tic)

        ranking = metrics.ranking_names(config.metrics.ks, full=config.metrics.ranking != "sampled")
        names = (
            tuple(phase.results[0].columns) if phase.results else (*result_columns(ranking), *strategy.device_columns)
        )
        columns = concat_columns(phase.results, names)
        ids = columns["device_id"].astype(np.int64)
        broadcast = broadcast_evaluation.of_devices(ids)
        columns |= {f"broadcast_{name}": broadcast[name] for name in ("auc", *ranking)}
        # a model the devices left to the cloud's evaluation of W_t (BROADCAST): the broadcast model's values
        for model, name in itertools.product(("start", "device"), ("auc", *ranking)):
            columns.setdefault(f"{model}_{name}", broadcast[name])
        columns.setdefault("n_queries", broadcast["n_queries"])
        actual = strategy.device_cost(cost, counts["n_local"][ids], counts["n_eval"][ids], columns)
        columns["flops"] = actual.flops
        times = latency.device_times(profiles.subset(ids), actual.flops, actual.download_bytes, actual.upload_bytes)
        cloud_flops = 3.0 * (cost.features + cost.head) * float(counts["n_local"][ids].sum())
        sim_round = (float(times.max()) if len(times) else 0.0) + cloud_flops / config.latency.cloud_flops

        frame = _device_frame(
            config,
            t,
            sampled,
            planned.flops,
            planned_times,
            columns,
            times,
            bucket_of_device,
            {"cloud": evaluation, "broadcast": broadcast_evaluation},
            strategy,
        )
        shared_download = actual.model_download_bytes
        broadcast_bytes = shared_download * len(participants) + int((actual.download_bytes - shared_download).sum())
        record = _round_record(
            config,
            t,
            num_devices,
            columns,
            frame,
            bucket_of_device,
            evaluation,
            clock.times,
            cloud_stats,
            sim_round,
            phase.failed_packs,
            phase.late_packs,
            shared_download,
            actual.upload_bytes,
            broadcast_bytes,
            strategy.round_columns(columns),
        )
        record.t_gather_s = phase.gather_s
        record.failed_devices = int(np.isin(pack_of_device[participants], phase.failed_packs).sum())
        record.t_setup_s = setup_s if t == first_round else math.nan
        state.records.append(record)
        state.device_frames.append(frame)
        record.t_round_s = time.perf_counter() - round_start
        record.peak_memory_mb = memory.take_peak()
        cloud_state = cloud.state()
        broadcast_evaluation = evaluation
        for observer in observers:
            observer.on_round(record, state, cloud_state)


def _device_frame(
    config: SimConfig,
    t: int,
    sampled: np.ndarray,
    planned_flops: np.ndarray,
    planned_times: np.ndarray,
    columns: dict[str, np.ndarray],
    times: np.ndarray,
    bucket_of_device: np.ndarray,
    cloud_side: dict[str, metrics.Evaluation],
    strategy: Strategy,
) -> dict[str, np.ndarray]:
    """One row per sampled device: results where they came back; where they did not, NaN (0 for counts), the planned
    FLOPs and time, straggler=True, and the strategy's default for its own columns. `cloud_side`: the cloud's
    evaluations of the updated ("cloud") and the broadcast model, which hold every evaluated device."""
    evaluation = cloud_side["cloud"]
    n = len(sampled)
    rows = np.searchsorted(sampled, columns["device_id"])
    frame = {
        "round": np.full(n, t, dtype=np.int64),
        "device_id": sampled,
        "bucket": bucket_of_device[sampled].astype(np.int64),
        "n_train": np.zeros(n, dtype=np.int64),
        "n_test": np.zeros(n, dtype=np.int64),
        "start_auc": np.full(n, np.nan),
        "device_auc": np.full(n, np.nan),
        "cloud_auc": evaluation.auc_of(sampled),
        "gate_passed": np.zeros(n, dtype=bool),
        "compute_s": np.full(n, np.nan),
        "sim_time_s": planned_times.copy(),
        "straggler": np.ones(n, dtype=bool),
        "flops": planned_flops.astype(np.float64),
        "broadcast_auc": cloud_side["broadcast"].auc_of(sampled),
        "n_queries": np.zeros(n, dtype=np.int64),
    }
    ranking = device_ranking_columns(config)[1:]
    of_devices = {model: e.of_devices(sampled) for model, e in cloud_side.items()}
    for name in ranking:
        model, metric = name.split("_", 1)
        frame[name] = of_devices[model][metric] if model in of_devices else np.full(n, np.nan)
    for name, missing in strategy.device_columns.items():
        frame[name] = np.full(n, missing)
    copied = ("n_train", "n_test", "start_auc", "device_auc", "gate_passed", "compute_s", "flops", "n_queries")
    device_side = [name for name in ranking if name.startswith(("start_", "device_"))]
    for name in (*copied, *device_side, *strategy.device_columns):
        frame[name][rows] = columns[name]
    frame["sim_time_s"][rows] = times
    frame["straggler"][rows] = False
    return frame


def _round_record(
    config: SimConfig,
    t: int,
    num_devices: int,
    columns: dict[str, np.ndarray],
    frame: dict[str, np.ndarray],
    bucket_of_device: np.ndarray,
    evaluation: metrics.Evaluation,
    times: dict[str, float],
    cloud_stats: dict[str, float],
    sim_round: float,
    failed_packs: list[int],
    late_packs: list[int],
    download: int,
    upload: int,
    broadcast_bytes: int,
    strategy_columns: dict[str, float],
) -> RoundRecord:
    tail = bucket_of_device[columns["device_id"].astype(np.int64)] == 0
    ranking = config.metrics.ranking
    names = metrics.ranking_names(config.metrics.ks, full=ranking != "sampled")
    # `full` reports full ranking alone: the sampled ranking columns (and their *_hr10 aliases) are left out / NaN
    reported = [name for name in names if ranking != "full" or name.startswith(metrics.FULL)]

    def pooled(prefix: str, mask: np.ndarray | slice = slice(None)) -> dict[str, float]:
        ranking = {name: columns[f"{prefix}_{name}"][mask] for name in names}
        n_test, n_queries = columns["n_test"][mask], columns["n_queries"][mask]
        return metrics.summarize_devices(n_test, columns[f"{prefix}_auc"][mask], n_queries, ranking)

    start, device, tail_start, tail_device = (
        pooled("start"),
        pooled("device"),
        pooled("start", tail),
        pooled("device", tail),
    )
    broadcast, tail_broadcast = pooled("broadcast"), pooled("broadcast", tail)
    cloud, tail_cloud = evaluation.overall, evaluation.buckets[0]
    # every model's ranking metrics at every cut-off, named <model>_hr@K, tail_<model>_ndcg@K, <model>_mrr ...
    ranking_columns = {
        f"{prefix}_{name}": values[name]
        for prefix, values in (
            ("broadcast", broadcast),
            ("tail_broadcast", tail_broadcast),
            ("start", start),
            ("tail_start", tail_start),
            ("device", device),
            ("tail_device", tail_device),
            ("cloud", cloud.ranking),
            ("tail_cloud", tail_cloud.ranking),
        )
        for name in reported
    }
    k = config.metrics.k

    def alias(values: dict[str, float], metric: str) -> float:
        """The sampled `metric` at k under its name from before `metrics.ks`."""
        return math.nan if ranking == "full" else values[f"{metric}@{k}"]

    compute = _spread(columns["compute_s"])
    return RoundRecord(
        round=t,
        strategy=config.strategy,
        n_devices=num_devices,
        n_participants=len(columns["device_id"]),
        n_stragglers=int(frame["straggler"].sum()),
        n_failed=len(failed_packs),
        broadcast_gauc=broadcast["gauc"],
        tail_broadcast_gauc=tail_broadcast["gauc"],
        start_gauc=start["gauc"],
        tail_start_gauc=tail_start["gauc"],
        start_hr10=alias(start, "hr"),
        start_ndcg10=alias(start, "ndcg"),
        device_gauc=device["gauc"],
        tail_device_gauc=tail_device["gauc"],
        device_hr10=alias(device, "hr"),
        device_ndcg10=alias(device, "ndcg"),
        tail_device_hr10=alias(tail_device, "hr"),
        tail_device_ndcg10=alias(tail_device, "ndcg"),
        cloud_auc=cloud.auc,
        cloud_gauc=cloud.gauc,
        cloud_hr10=alias(cloud.ranking, "hr"),
        cloud_ndcg10=alias(cloud.ranking, "ndcg"),
        tail_cloud_gauc=tail_cloud.gauc,
        tail_cloud_hr10=alias(tail_cloud.ranking, "hr"),
        tail_cloud_ndcg10=alias(tail_cloud.ranking, "ndcg"),
        gate_pass_rate=float(columns["gate_passed"].mean()) if len(columns["gate_passed"]) else math.nan,
        t_broadcast_s=times["t_broadcast_s"],
        t_devices_s=times["t_devices_s"],
        t_gather_s=0.0,
        t_distill_s=times["t_distill_s"],
        t_eval_s=times["t_eval_s"],
        t_checkpoint_s=0.0,
        t_round_s=0.0,
        sim_round_s=sim_round,
        device_compute_min_s=compute["min"],
        device_compute_p50_s=compute["p50"],
        device_compute_p95_s=compute["p95"],
        device_compute_max_s=compute["max"],
        broadcast_bytes=broadcast_bytes,
        upload_bytes_per_device=upload,
        download_bytes_per_device=download,
        late_packs=len(late_packs),
        no_device_results=len(columns["device_id"]) == 0,
        **ranking_columns,
        **strategy_columns,
        **{key if key.startswith("cloud_") else f"cloud_{key}": float(value) for key, value in cloud_stats.items()},
    )
