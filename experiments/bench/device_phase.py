"""Part 2, the device phase: one round's device step over N synthetic devices, placed four ways.

- `packed_in_process`: the strategy's device step (`DeviceHost.train_round`) on one `DeviceHost` holding every
  device, torch on one thread. Pure compute: the reference the others' per-device overhead is measured against.
  Its phases are timed apart by running the step's pieces alone: features (z_0 of the local samples and each
  device's hold-out slice for the gate, `DeviceHost.patch_samples`),
  training (`metapatch_device_step`), and the remainder (evaluation, sample selection, result columns).
- `packed_ray`: `RayRuntime`'s device phase with the default placement (about one pack per CPU), as the round
  loop times it (`t_devices_s`), after the broadcast is in the object store.
- `actor_per_device_ray`: the same with `runtime.devices_per_actor = 1`, measured at a small count only: each
  actor is a process holding torch and a model. Larger counts get an explicit "skipped" entry.
- `packed_training` and `loop`: the training step alone, `metapatch_device_step`, packed (every device at once) and
  called with K = 1 for each device in turn; the loop's overhead is against the packed training step.

Each time is the median over repeats after one untimed call (actor start-up, first-call costs). Device-samples
trained are the samples passed through training (the gate's trial run plus the refit, times the local epochs).
FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` (matrix products, forward and backward: what the
matmul ceiling measures) over one in-process run; the latency model's estimate (the strategy's `device_cost` of
what the devices reported) is recorded beside them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
import ray
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import bench_config, median_time, pretrain_cache, ratio, ray_started, torch_threads
from dccl_sim.algorithms.metapatch_step import metapatch_device_step
from dccl_sim.algorithms.protocol import Broadcast, PackResult, concat_uploads
from dccl_sim.config import SimConfig
from dccl_sim.context import RoundContext
from dccl_sim.data.prepare import prepare_dataset
from dccl_sim.data.store import read_meta
from dccl_sim.hosts.cloud import CloudHost, ModelCost
from dccl_sim.hosts.device import DeviceHost
from dccl_sim.runtime.base import DevicePhase
from dccl_sim.runtime.memory import tree_memory_mb
from dccl_sim.runtime.placement import plan_packs
from dccl_sim.runtime.ray_runtime import RayRuntime

MIB = 2**20


@dataclass(frozen=True)
class Ceiling:
    """Measured matmul FLOP/s (part 1); None where part 1 did not run."""

    one_thread: float | None = None
    all_threads: float | None = None


@dataclass(frozen=True)
class Round0:
    """A dataset, the round-0 broadcast of its pretrained cloud to every device, and the config behind them."""

    overrides: tuple[str, ...]
    config: SimConfig
    root: str
    broadcast: Broadcast
    device_counts: dict[str, np.ndarray]  # the cloud's n_local and n_eval per device, for the latency model
    model_cost: ModelCost  # the models' sizes and FLOPs per sample, for the latency model

    @property
    def device_ids(self) -> np.ndarray:
        return self.broadcast.participants

    @classmethod
    def build(cls, devices: int, overrides: Sequence[str]) -> Round0:
        config = bench_config(devices, overrides)
        root = prepare_dataset(config.data, config.seed)
        cloud = CloudHost(config, root)
        cloud.pretrain(pretrain_cache(config))
        ids = np.arange(read_meta(root).num_devices, dtype=np.int64)
        broadcast = cloud.broadcast(0, ids)
        return cls(tuple(overrides), config, root, broadcast, cloud.device_counts(0), cloud.model_cost())


def counted_flops(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def max_abs_diff(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max()) if len(a) else 0.0


def measure_in_process(r0: Round0, repeats: int) -> dict[str, Any]:
    """The packed step in this process on one thread: whole, by phase, and as a per-device loop of its training."""
    config, b, ids = r0.config, r0.broadcast, r0.device_ids
    with torch_threads(1):
        host = DeviceHost(config, r0.root, ids)
        host.train_round(b)  # untimed: first-call costs; it also loads the broadcast into the host's models
        total_s, total_all, result = median_time(lambda: host.train_round(b), repeats)
        local = host.local_samples(ids, b.round)
        features_s, _, samples = median_time(lambda: host.patch_samples(ids, local), repeats)
        # the MetaPatch-style strategy's starting meta-patches (dccl: the broadcast's θ̃ rows; metapatch: zeros)
        theta0 = host.strategy.start_theta(b, ids)
        model, patch, device = host.models.cloud, host.models.patch, config.device
        ctx = RoundContext(config, b.round, b.participants)

        def packed():
            return metapatch_device_step(model, patch, samples, theta0, device, ctx)

        def loop():
            return [
                metapatch_device_step(model, patch, samples.alone(m), theta0[m : m + 1], device, ctx)
                for m in range(len(ids))
            ]

        train_s, _, step = median_time(packed, repeats)
        loop_s, loop_all, looped = median_time(loop, repeats)
        flops = {
            "features": counted_flops(lambda: host.patch_samples(ids, local)),
            "training": counted_flops(packed),
            "total": counted_flops(lambda: host.train_round(b)),
        }
    flops["evaluation_and_rest"] = flops["total"] - flops["features"] - flops["training"]
    counts = r0.device_counts
    trained = result.columns["samples_trained"]
    # the latency model's FLOPs of what the devices reported (their result columns: samples trained)
    modelled = host.strategy.device_cost(
        r0.model_cost, counts["n_local"][ids], counts["n_eval"][ids], result.columns
    ).flops
    return {
        "total_s": total_s,
        "total_s_all": total_all,
        "phases_s": {
            "features": features_s,
            "training": train_s,
            "evaluation_and_rest": total_s - features_s - train_s,
        },
        "loop_s": loop_s,
        "loop_s_all": loop_all,
        "loop_max_abs_theta_diff": max_abs_diff(step.theta, torch.cat([r.theta for r in looped])),
        "theta": result.uploads["theta"],
        "samples_trained": int(trained.sum()),
        "local_samples_per_device": float(np.mean(local.ends - local.starts)),
        "evaluated_devices": int(np.count_nonzero(result.columns["n_test"])),
        "gate_pass_rate": float(result.columns["gate_passed"].mean()),
        "flops_counted": flops,
        "flops_modelled": float(modelled.sum()),
    }


def measure_ray(r0: Round0, placement: Sequence[str], repeats: int) -> dict[str, Any]:
    """`RayRuntime`'s device phase over every device: `placement` overrides the runtime settings."""
    config = bench_config(len(r0.device_ids), [*r0.overrides, *placement])
    runtime = RayRuntime()
    packs = plan_packs(len(r0.device_ids), config.runtime, runtime.num_cpus)
    runtime.start(config, r0.root, packs)
    try:
        runtime.cloud.pretrain(pretrain_cache(config))
        handle = runtime.broadcast(0, r0.device_ids)
        ray.wait([handle])  # the broadcast is built and stored: the device phase starts from there
        every_pack = list(range(len(packs)))

        def device_phase() -> DevicePhase:
            return runtime.run_devices(handle, every_pack, None)

        first_s, _, _ = median_time(device_phase, 1)  # includes the actors' start-up: not in the median
        actors_mb = actor_memory_mb(DeviceHost.__name__)
        wall_s, wall_all, phase = median_time(device_phase, repeats)
    finally:
        runtime.shutdown()
    _, theta = concat_uploads(phase.results, "theta")
    return {
        "wall_s": wall_s,
        "wall_s_all": wall_all,
        "first_call_s": first_s,
        "actors": len(packs),
        "memory_per_actor_mb": float(np.median(actors_mb)) if actors_mb else None,
        "in_actor_compute_s": max(_compute_s(result) for result in phase.results),
        "samples_trained": int(sum(r.columns["samples_trained"].sum() for r in phase.results)),
        "theta": theta,
    }


def actor_memory_mb(class_name: str) -> list[float]:
    """PSS in MiB of each live actor process of `class_name` under this process (Ray titles them `ray::CLASS`, with
    `.method` while one runs); empty where Ray runs outside this process tree."""
    sizes = []
    for process in psutil.Process().children(recursive=True):
        try:
            title = process.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if title and title[0].startswith(f"ray::{class_name}"):
            sizes.append(tree_memory_mb(process))
    return sizes


def _compute_s(result: PackResult) -> float:
    """A pack's own compute time: its devices' shares of it add up to the whole."""
    return float(result.columns["compute_s"].sum())


def actor_skip_reason(devices: int, measured_at: int, per_actor_mb: float | None, ram_gib: float) -> str:
    """Why one actor per device is not run at `devices`: the memory it would take, against this machine's RAM."""
    if per_actor_mb is None:
        return f"skipped: one actor per device was not measured (--actor-devices {measured_at})"
    need_gib = devices * per_actor_mb / 1024
    verdict = ">" if need_gib > ram_gib else "≤"
    return (
        f"skipped: {devices:,} actors × ~{per_actor_mb:.0f} MB = {need_gib:.1f} GiB {verdict} RAM {ram_gib:.1f} GiB; "
        f"one actor per device is measured at {measured_at} devices only"
    )


def _variant(
    wall_s: float, reference_s: float, devices: int, samples: int, flops: float, ceiling: float | None
) -> dict[str, Any]:
    """Throughput, per-device overhead against `reference_s` and FLOP/s against the ceiling, for one variant."""
    return {
        "wall_s": wall_s,
        "samples_per_s": samples / wall_s,
        "overhead_ms_per_device": 1000 * (wall_s - reference_s) / devices,
        "flops_per_s": flops / wall_s,
        "fraction_of_ceiling": ratio(flops / wall_s, ceiling),
    }


def measure_point(
    devices: int, overrides: Sequence[str], repeats: int, ceiling: Ceiling, actor_per_device: bool
) -> dict[str, Any]:
    r0 = Round0.build(devices, overrides)
    local = measure_in_process(r0, repeats)
    flops, samples, total_s = local["flops_counted"], local["samples_trained"], local["total_s"]
    phases = {
        name: {
            "seconds": seconds,
            "flops": flops[name],
            "flops_per_s": flops[name] / seconds if seconds > 0 else None,
            "fraction_of_ceiling": ratio(flops[name] / seconds, ceiling.one_thread) if seconds > 0 else None,
        }
        for name, seconds in local["phases_s"].items()
    }
    train_s = local["phases_s"]["training"]
    variants: dict[str, Any] = {
        "packed_in_process": {
            **_variant(total_s, total_s, devices, samples, flops["total"], ceiling.one_thread),
            "wall_s_all": local["total_s_all"],
            "threads": 1,
            "phases": phases,
        },
        "packed_training": {
            **_variant(train_s, train_s, devices, samples, flops["training"], ceiling.one_thread),
            "threads": 1,
            "scope": "training only (metapatch_device_step on every device at once)",
        },
        "loop": {
            **_variant(local["loop_s"], train_s, devices, samples, flops["training"], ceiling.one_thread),
            "wall_s_all": local["loop_s_all"],
            "threads": 1,
            "scope": "training only (metapatch_device_step), against the packed training phase",
            "speedup_of_packed": local["loop_s"] / train_s,
            "max_abs_theta_diff": local["loop_max_abs_theta_diff"],
        },
    }
    placements = {"packed_ray": [], "actor_per_device_ray": ["runtime.devices_per_actor=1"]}
    for name, placement in placements.items():
        if name == "actor_per_device_ray" and not actor_per_device:
            continue
        ray_run = measure_ray(r0, placement, repeats)
        variants[name] = {
            **_variant(ray_run["wall_s"], total_s, devices, samples, flops["total"], ceiling.all_threads),
            "wall_s_all": ray_run["wall_s_all"],
            "first_call_s": ray_run["first_call_s"],
            "actors": ray_run["actors"],
            "memory_per_actor_mb": ray_run["memory_per_actor_mb"],
            "runtime_overhead_ms_per_device": 1000 * (ray_run["wall_s"] - ray_run["in_actor_compute_s"]) / devices,
            "speedup_over_in_process": total_s / ray_run["wall_s"],
            "max_abs_theta_diff": max_abs_diff(ray_run["theta"], local["theta"]),
            "same_samples_trained": ray_run["samples_trained"] == samples,
        }
    return {
        "devices": devices,
        "local_samples_per_device": local["local_samples_per_device"],
        "samples_trained": samples,
        "evaluated_devices": local["evaluated_devices"],
        "gate_pass_rate": local["gate_pass_rate"],
        "flops_counted": flops,
        "flops_modelled": local["flops_modelled"],
        "variants": variants,
    }


def measure(
    devices: Sequence[int], actor_devices: int, overrides: Sequence[str], repeats: int, ceiling: Ceiling
) -> dict[str, Any]:
    """Every device count of `devices` (and `actor_devices`, where one actor per device is measured), smallest
    first; one embedded Ray serves them all (or the one already running)."""
    counts = sorted({*devices, actor_devices} - {0})
    with ray_started() as cpus:
        points = [measure_point(n, overrides, repeats, ceiling, actor_per_device=n == actor_devices) for n in counts]
    measured = next((p for p in points if p["devices"] == actor_devices), None)
    per_actor_mb = measured["variants"]["actor_per_device_ray"]["memory_per_actor_mb"] if measured else None
    ram_gib = psutil.virtual_memory().total / 2**30
    for point in points:
        if point["devices"] != actor_devices:
            reason = actor_skip_reason(point["devices"], actor_devices, per_actor_mb, ram_gib)
            point["variants"]["actor_per_device_ray"] = {"skipped": reason}
    return {
        "setting": list(overrides),
        "flops_method": "counted with torch.utils.flop_counter.FlopCounterMode (matrix products, forward and "
        "backward) over one in-process run; flops_modelled: the strategy's Strategy.device_cost (the latency model) "
        "of what the devices reported",
        "ray_cpus": cpus,
        "ceiling_flops": {"one_thread": ceiling.one_thread, "all_threads": ceiling.all_threads},
        "points": points,
    }
