"""Part 5's side-by-side run: Flower's simulation engine against dccl-sim's packed device step, in one process.

Run by `bench/flower.py` as `.venv-flower/bin/python -m bench.flower_sim` (with `experiments/` on the path), because
`flwr[simulation]` pins ray 2.55.1 and dccl-sim's own environment has ray 2.60.0 (`make bench-flower-env` builds
that environment). It writes one JSON file (`--out`).

The device step measured, for each device of a synthetic dataset built as the device phase builds it (part 2): load
the round-0 broadcast (cloud model, patch generator, participants' starting meta-patches) into the device's models,
compute z_0 of its local samples under it (`DeviceHost.patch_samples`), and run `metapatch_device_step`, which
returns its meta-patch θ̂ (k floats). Evaluation is not part of it. Three ways:

- `flower`: a ClientApp per device (`@app.train()`, Flower's Message API), the device id being its node's
  `partition-id`; the ServerApp's `main` sends every node the round-0 broadcast as an ArrayRecord in one Message per
  node and collects the θ̂ of the replies, for two rounds (both round 0 of dccl-sim: the same work twice) in one
  `flwr.simulation.run_simulation` call with Flower's default backend config (Ray started by Flower on every core)
  but `client_resources` as given, by default 1 CPU per ClientApp: an actor per core, torch on one thread in each.
  Flower's own default, 2 CPUs, gives one actor on both cores whose two torch threads contend with Flower's engine
  process for them; at 1,000 clients its step then took 159 ms instead of 12.6 (2026-12-04, NOTES.md). Startup
  excluded: the second round, from building its messages to the last reply. Startup included: the whole call less
  the second round, i.e. a one-round simulation (Ray and actor start-up, each actor reading the dataset on its
  first message, the round).
- `packed_in_process`: the same step for every device at once on one `DeviceHost` in this process, torch on one
  thread. Startup excluded: the median call after the first; included: reading the devices' data plus the first
  call.
- `packed_ray`: `RayRuntime.run_devices` (dccl-sim's device phase, default placement: about one pack per CPU) on
  the same broadcast put in the object store. Its actors run the strategy's whole device round, evaluation
  included, so their config evaluates a single device (`metrics.eval_devices = 1`, which changes neither the data
  trained on nor θ̂). Startup excluded: the median phase after the first; included: starting Ray and the runtime
  (its actors read their devices' data; the cloud actor, created too, reads the dataset meanwhile) plus the first
  phase.

Every variant's device data is read with that same one-device evaluation setting (only the training samples are
used); the broadcast is the one part 2 would build (same overrides, the pretrained cloud from the same cache).
`max_abs_theta_diff`: Flower's and Ray's θ̂ against the in-process packed θ̂.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flwr
import numpy as np
import ray
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from bench.common import bench_config, median_time, ratio, torch_threads, versions
from bench.device_phase import Round0, max_abs_diff
from bench.flower import CLIENT_CPUS
from bench.flower_app import broadcast_record, client_app, device_step
from dccl_sim.algorithms.protocol import concat_uploads
from dccl_sim.hosts.device import DeviceHost
from dccl_sim.runtime.placement import plan_packs
from dccl_sim.runtime.ray_runtime import RayRuntime

# the device data of every variant: only the training samples are used, so one evaluated device keeps the reading
# (and packed Ray's evaluation) small without changing what is trained
DEVICE_OVERRIDES = ("metrics.eval_devices=1",)
FLOWER_ROUNDS = 2  # the first round carries the start-up; the second is the round with start-up excluded
NODE_WAIT_S = 600.0


# --- the ServerApp ----------------------------------------------------------------------------------------------


@dataclass
class FlowerRun:
    """What one `run_simulation` call measured, filled by the ServerApp's thread."""

    rounds_s: list[float] = field(default_factory=list)
    theta: dict[int, np.ndarray] = field(default_factory=dict)  # the last round's, by device
    metrics: list[list[dict[str, Any]]] = field(default_factory=list)  # per round, per reply


def wait_for_nodes(grid: Grid, count: int) -> list[int]:
    """The simulation registers its nodes while the ServerApp starts: wait for all of them."""
    deadline = time.perf_counter() + NODE_WAIT_S
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count or time.perf_counter() > deadline:
            return nodes
        time.sleep(0.05)


def server_app(r0: Round0, device_overrides: Sequence[str], record: FlowerRun) -> ServerApp:
    app = ServerApp()
    devices = len(r0.device_ids)

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        nodes = wait_for_nodes(grid, devices)
        if len(nodes) != devices:
            raise RuntimeError(f"{len(nodes)} of {devices} Flower nodes registered")
        setting = ConfigRecord(
            {"overrides": list(device_overrides), "root": r0.root, "devices": devices, "round": r0.broadcast.round}
        )
        content = RecordDict({"broadcast": broadcast_record(r0.broadcast), "setting": setting})
        for server_round in range(1, FLOWER_ROUNDS + 1):
            tic = time.perf_counter()
            messages = [
                Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(server_round))
                for node in nodes
            ]
            replies = list(grid.send_and_receive(messages))
            record.rounds_s.append(time.perf_counter() - tic)
            errors = [reply.error.reason for reply in replies if reply.has_error()]
            if errors or len(replies) != devices:
                raise RuntimeError(f"round {server_round}: {len(replies)} replies, errors: {errors[:3]}")
            metrics = [dict(reply.content["metrics"]) for reply in replies]
            record.metrics.append(metrics)
            record.theta = {
                int(m["device"]): reply.content["theta"]["theta"].numpy()[0]
                for m, reply in zip(metrics, replies, strict=True)
            }

    return app


def run_flower(r0: Round0, device_overrides: Sequence[str], client_cpus: float) -> tuple[float, FlowerRun]:
    """One `run_simulation` call of FLOWER_ROUNDS rounds on a fresh Ray: (its wall time, what it measured)."""
    record = FlowerRun()
    backend_config = {"client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0}}
    tic = time.perf_counter()
    run_simulation(
        server_app=server_app(r0, device_overrides, record),
        client_app=client_app,
        num_supernodes=len(r0.device_ids),
        backend_config=backend_config,
    )
    call_s = time.perf_counter() - tic
    if ray.is_initialized():  # Flower leaves its Ray running: every call (and the Ray variant) starts its own
        ray.shutdown()
    if len(record.rounds_s) != FLOWER_ROUNDS:
        raise RuntimeError(f"the Flower simulation ran {len(record.rounds_s)} of {FLOWER_ROUNDS} rounds")
    return call_s, record


def measure_flower(r0: Round0, device_overrides: Sequence[str], client_cpus: float, repeats: int) -> dict[str, Any]:
    devices = len(r0.device_ids)
    runs = [run_flower(r0, device_overrides, client_cpus) for _ in range(repeats)]
    round_all = [record.rounds_s[-1] for _, record in runs]
    included_all = [call_s - record.rounds_s[-1] for call_s, record in runs]
    # each client's own step time (reading the broadcast, z_0, metapatch_device_step), as its actor measured it
    step_all = [statistics.fmean(m["compute_s"] for m in record.metrics[-1]) for _, record in runs]
    round_s, included_s, step_s = (statistics.median(values) for values in (round_all, included_all, step_all))
    last = runs[-1][1].metrics[-1]
    actors = len({m["pid"] for m in last})
    return {
        "round_s": round_s,
        "round_s_all": round_all,
        "included_s": included_s,
        "included_s_all": included_all,
        "call_s_all": [call_s for call_s, _ in runs],
        "first_round_s_all": [record.rounds_s[0] for _, record in runs],
        "ms_per_client_excluded": 1000 * round_s / devices,
        "ms_per_client_included": 1000 * included_s / devices,
        "client_step_ms": 1000 * step_s,
        # what the engine adds: the round per client less the clients' own step time, shared by the actors
        "engine_overhead_ms_per_client": 1000 * (round_s / devices - step_s / actors),
        "actors": actors,
        "torch_threads": sorted({int(m["torch_threads"]) for m in last}),
        "gate_passed": sum(int(m["gate_passed"]) for m in last),
        "theta": np.stack([runs[-1][1].theta[int(device)] for device in r0.device_ids]),
    }


# --- dccl-sim's packed step ------------------------------------------------------------------------------------


def measure_in_process(r0: Round0, device_overrides: Sequence[str], repeats: int) -> dict[str, Any]:
    ids, broadcast = r0.device_ids, r0.broadcast
    config = bench_config(len(ids), device_overrides)
    with torch_threads(1):
        tic = time.perf_counter()
        host = DeviceHost(config, r0.root, ids)
        read_s = time.perf_counter() - tic
        first_s, _, _ = median_time(lambda: device_step(host, broadcast, ids), 1)
        wall_s, wall_all, step = median_time(lambda: device_step(host, broadcast, ids), repeats)
    devices = len(ids)
    return {
        "wall_s": wall_s,
        "wall_s_all": wall_all,
        "read_data_s": read_s,
        "first_call_s": first_s,
        "included_s": read_s + first_s,
        "ms_per_device_excluded": 1000 * wall_s / devices,
        "ms_per_device_included": 1000 * (read_s + first_s) / devices,
        "threads": 1,
        "gate_passed": int(step.gate_passed.sum()),
        "theta": step.theta.numpy(),
    }


def measure_ray(r0: Round0, device_overrides: Sequence[str], repeats: int) -> dict[str, Any]:
    ids = r0.device_ids
    config = bench_config(len(ids), device_overrides)
    tic = time.perf_counter()
    runtime = RayRuntime()
    try:
        packs = plan_packs(len(ids), config.runtime, runtime.num_cpus)
        runtime.start(config, r0.root, packs)
        started_s = time.perf_counter() - tic
        handle = ray.put(r0.broadcast)  # the cloud's part: not timed, as Flower's broadcast is built before its call
        every_pack = list(range(len(packs)))
        first_s, _, _ = median_time(lambda: runtime.run_devices(handle, every_pack, None), 1)
        wall_s, wall_all, phase = median_time(lambda: runtime.run_devices(handle, every_pack, None), repeats)
    finally:
        runtime.shutdown()
    _, theta = concat_uploads(phase.results, "theta")
    devices = len(ids)
    compute_s = max(float(result.columns["compute_s"].sum()) for result in phase.results)
    return {
        "wall_s": wall_s,
        "wall_s_all": wall_all,
        "start_s": started_s,
        "first_call_s": first_s,
        "included_s": started_s + first_s,
        "ms_per_device_excluded": 1000 * wall_s / devices,
        "ms_per_device_included": 1000 * (started_s + first_s) / devices,
        "actors": len(packs),
        "runtime_overhead_ms_per_device": 1000 * (wall_s - compute_s) / devices,
        "evaluated_devices": int(sum(np.count_nonzero(r.columns["n_test"]) for r in phase.results)),
        "gate_passed": int(sum(r.columns["gate_passed"].sum() for r in phase.results)),
        "theta": theta,
    }


def measure_point(devices: int, overrides: Sequence[str], client_cpus: float, repeats: int) -> dict[str, Any]:
    r0 = Round0.build(devices, overrides)
    device_overrides = [*overrides, *DEVICE_OVERRIDES]
    local = measure_in_process(r0, device_overrides, repeats)
    packed_ray = measure_ray(r0, device_overrides, repeats)
    flower_run = measure_flower(r0, device_overrides, client_cpus, repeats)
    reference = local.pop("theta")
    flower_run["max_abs_theta_diff"] = max_abs_diff(flower_run.pop("theta"), reference)
    packed_ray["max_abs_theta_diff"] = max_abs_diff(packed_ray.pop("theta"), reference)
    ratios = {
        name: {
            "excluded": ratio(flower_run["ms_per_client_excluded"], variant["ms_per_device_excluded"]),
            "included": ratio(flower_run["ms_per_client_included"], variant["ms_per_device_included"]),
        }
        for name, variant in (("packed_in_process", local), ("packed_ray", packed_ray))
    }
    return {
        "devices": devices,
        "flower": flower_run,
        "packed_in_process": local,
        "packed_ray": packed_ray,
        "flower_over_dccl_sim": ratios,
    }


def measure(devices: Sequence[int], overrides: Sequence[str], client_cpus: float, repeats: int) -> dict[str, Any]:
    points = [measure_point(n, overrides, client_cpus, repeats) for n in sorted(devices)]
    return {
        "status": "measured",
        "flwr_version": flwr.__version__,
        "environment": versions(),  # this process's: .venv-flower, with Flower's Ray
        "api": "flwr.simulation.run_simulation: a ServerApp main sending one Message per node, a ClientApp @train",
        "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
        "flower_rounds": FLOWER_ROUNDS,
        "ray_cpus": os.cpu_count(),
        "setting": list(overrides),
        "device_overrides": list(DEVICE_OVERRIDES),
        "points": points,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flower_sim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", required=True, help="device (client) counts")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--client-cpus", type=float, default=CLIENT_CPUS, help="Flower's client_resources num_cpus")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    args = parser.parse_args(argv)
    results = measure(args.devices, args.overrides, args.client_cpus, args.repeats)
    args.out.write_text(json.dumps(results, indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
