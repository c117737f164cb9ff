"""Part 6, the cloud on several workers (docs/scale-out.md): what the data-parallel cloud update costs per step at 1,
2 and 3 workers here, a cost model fitted to those measurements, and the cloud-update time and efficiency it projects
for 16 and 64 workers at 10^6 devices.

Measured, all on this machine:
- `update`: one dccl round-0 cloud update in-process (1 thread) on `devices` synthetic devices, after a real device
  phase: its total time, the time inside the data-parallel minibatch loops (`minibatch_loop`, counted steps) and the
  rest, the forward-only passes (z_0, the teachers), which the workers share out (`split_work`); the cloud's
  evaluation (worker 0 only) beside it.
- `step_s`: one training step (forward, backward, Adam) of the cloud model on a part of b samples, for the part sizes
  a minibatch of `cloud.batch_size` splits into at every worker count measured or projected.
- `allreduce_s`: one all-reduce of the gradient buffer (the model's parameters, float32) among W processes joined by
  gloo over loopback, for two buffer sizes, so that latency and bandwidth can be told apart.
- `runs`: the real thing, `cloud.workers = W` on the embedded Ray: the round's cloud-update time (`t_distill_s`).

The projection scales the update's steps and forward-only work linearly in devices (the same samples per device),
prices a step at W workers as step_s(part) + allreduce(W) (the ring all-reduce model 2(W−1)·α + 2(W−1)/W · S / β,
with α and β fitted on loopback and, as a stated assumption for a cluster, a 10 Gbit/s network with 50 µs latency),
and the forward-only work as its 1-worker time / W plus the all-reduce of its outputs (two floats per sample).
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dccl_sim.algorithms.cloud_steps as cloud_steps
import dccl_sim.models.training as training
from bench.common import bench_config, pretrain_cache, torch_threads
from dccl_sim.algorithms import data_parallel
from dccl_sim.data.prepare import prepare_dataset
from dccl_sim.hosts.cloud import CloudHost
from dccl_sim.hosts.device import DeviceHost
from dccl_sim.runtime.session import run

CLUSTER_NETWORK = {"alpha_s": 50e-6, "beta_bytes_per_s": 10e9 / 8}  # the assumed cluster: 10 Gbit/s, 50 µs
ALLREDUCE_SIZES = (1, 16)  # buffers of 1× and 16× the gradient, to separate latency from bandwidth
STEPS_PER_SIZE = 20


def measure(
    devices: int,
    workers: Sequence[int],
    projected: Sequence[int],
    project_devices: int,
    overrides: Sequence[str],
    repeats: int,
    work_dir: Path,
) -> dict[str, Any]:
    config = bench_config(devices, overrides)
    root = prepare_dataset(config.data, config.seed)
    with torch_threads(1):
        cloud = CloudHost(config, root, 1)
        cloud.pretrain(pretrain_cache(config))
        update = _update_split(cloud, config, root)
        batch = config.cloud.batch_size
        parts = sorted({-(-batch // w) for w in (*workers, *projected)}, reverse=True)
        step_s = {b: _step_time(cloud, b, repeats) for b in parts}
    floats = sum(p.numel() for p in cloud.models.cloud.parameters())
    allreduce = {w: {k: _allreduce_time(w, k * floats, repeats) for k in ALLREDUCE_SIZES} for w in workers if w > 1}
    alpha, beta = _fit_ring(allreduce, 4 * floats)
    runs = [_real_update(config, w, work_dir) for w in workers]
    scale = project_devices / update["devices"]
    model = {
        "steps": update["steps"] * scale,
        "forward_s": update["forward_s"] * scale,
        "forward_bytes": 2 * 4 * update["samples"] * scale,  # the teachers' and the base logits, gathered
        "evaluation_s": update["evaluation_s"],  # a fixed evaluation sample (metrics.eval_devices), worker 0 only
        "gradient_bytes": 4 * floats,
    }
    networks = {"loopback": {"alpha_s": alpha, "beta_bytes_per_s": beta}, "cluster_10gbit": CLUSTER_NETWORK}
    counts = sorted({1, *workers, *projected})
    projection = {
        f"{name}, {regime}": [_project(model, step_s, batch, w, net, regime == "batch per worker") for w in counts]
        for name, net in networks.items()
        for regime in ("same minibatches", "batch per worker")
    }
    return {
        "devices": devices,
        "batch_size": batch,
        "update": update,
        "step_s": {str(b): s for b, s in step_s.items()},
        "allreduce_s": {str(w): {f"{k}x": s for k, s in sizes.items()} for w, sizes in allreduce.items()},
        "networks": networks,
        "runs": runs,
        "project_devices": project_devices,
        "model": model,
        "projection": projection,
    }


@contextmanager
def _loop_clock(records: list[dict[str, float]]) -> Iterator[None]:
    """Time every `minibatch_loop` call of the cloud steps and `fit`, with the minibatch steps it took."""
    real = data_parallel.minibatch_loop

    def timed(n: int, *args: Any, epochs: int, batch_size: int, **kwargs: Any) -> list[float]:
        tic = time.perf_counter()
        losses = real(n, *args, epochs=epochs, batch_size=batch_size, **kwargs)
        records.append({"s": time.perf_counter() - tic, "steps": epochs * math.ceil(n / batch_size)})
        return losses

    training.minibatch_loop, cloud_steps.minibatch_loop = timed, timed
    try:
        yield
    finally:
        training.minibatch_loop, cloud_steps.minibatch_loop = real, real


def _update_split(cloud: CloudHost, config: Any, root: str) -> dict[str, float]:
    """Round 0 of dccl: a real device phase in-process, then the cloud update timed, loops apart."""
    participants = np.arange(cloud.data.num_devices, dtype=np.int64)
    broadcast = cloud.broadcast(0, participants)
    results = [DeviceHost(config, root, participants, 1).train_round(broadcast)]
    records: list[dict[str, float]] = []
    with _loop_clock(records):
        tic = time.perf_counter()
        stats = cloud.update(0, participants, results)
        total = time.perf_counter() - tic
    tic = time.perf_counter()
    cloud.evaluate()
    evaluation = time.perf_counter() - tic
    in_loops = sum(r["s"] for r in records)
    return {
        "devices": int(cloud.data.num_devices),
        "samples": float(stats["cloud_samples"]),
        "total_s": total,
        "in_loops_s": in_loops,
        "forward_s": total - in_loops,
        "steps": float(sum(r["steps"] for r in records)),
        "evaluation_s": evaluation,
    }


def _step_time(cloud: CloudHost, part: int, repeats: int) -> float:
    """Median seconds of one fine-tuning step (forward, BCE, backward, Adam) on `part` samples."""
    model, data = cloud.models.cloud, cloud.data
    indices = cloud.pretraining_indices()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-6, fused=True)
    rng = np.random.default_rng(0)
    times = []
    model.train()
    for step in range(STEPS_PER_SIZE * repeats + 3):
        chunk = indices[rng.integers(0, len(indices), part)]
        tic = time.perf_counter()
        batch = data.batch(chunk, cloud.config.data.history_len)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= 3:  # warm-up
            times.append(time.perf_counter() - tic)
    model.eval()
    return float(np.median(times))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _allreduce_worker(rank: int, workers: int, port: int, floats: int, repeats: int, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=workers)
    buffer = torch.ones(floats)
    times = []
    for i in range(5 + 10 * repeats):
        dist.barrier()
        tic = time.perf_counter()
        dist.all_reduce(buffer)
        if i >= 5:
            times.append(time.perf_counter() - tic)
    if rank == 0:
        Path(out).write_text(str(float(np.median(times))))
    dist.destroy_process_group()


def _allreduce_time(workers: int, floats: int, repeats: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "t")
        mp.spawn(_allreduce_worker, args=(workers, _free_port(), floats, repeats, out), nprocs=workers, join=True)
        return float(Path(out).read_text())


def _fit_ring(allreduce: dict[int, dict[int, float]], gradient_bytes: int) -> tuple[float, float]:
    """α (s per message step) and β (bytes/s) of t = 2(W−1)·α + 2(W−1)/W · S / β, least squares over the measured
    (W, S) points."""
    rows, times = [], []
    for w, sizes in allreduce.items():
        for k, seconds in sizes.items():
            rows.append([2 * (w - 1), 2 * (w - 1) / w * k * gradient_bytes])
            times.append(seconds)
    if not rows:
        return 0.0, math.inf
    (alpha, inverse_beta), *_ = np.linalg.lstsq(np.array(rows), np.array(times), rcond=None)
    return max(float(alpha), 0.0), 1.0 / inverse_beta if inverse_beta > 0 else math.inf


def _ring(workers: int, nbytes: float, network: dict[str, float]) -> float:
    if workers == 1:
        return 0.0
    return 2 * (workers - 1) * network["alpha_s"] + 2 * (workers - 1) / workers * nbytes / network["beta_bytes_per_s"]


def _step_at(step_s: dict[int, float], part: int) -> float:
    """A step's time on `part` samples: measured where it was, else interpolated linearly in the part size."""
    if part in step_s:
        return step_s[part]
    sizes = sorted(step_s)
    return float(np.interp(part, sizes, [step_s[b] for b in sizes]))


def _project(
    model: dict[str, float], step_s: dict[int, float], batch: int, workers: int, network: dict, per_worker: bool
) -> dict:
    """The update at `workers` workers. `per_worker = False`: the same minibatches of `batch` split over the workers
    (what `cloud.workers` does: the same model); True: a minibatch of `batch` per worker, W × batch in all, 1/W of
    the steps (what raising `cloud.batch_size` with the workers would do: another optimization, the usual
    data-parallel regime)."""
    part = batch if per_worker else -(-batch // workers)
    step = _step_at(step_s, part) + _ring(workers, model["gradient_bytes"], network)
    steps = model["steps"] / workers if per_worker else model["steps"]
    one = model["forward_s"] + model["steps"] * _step_at(step_s, batch)
    forward = model["forward_s"] / workers + _ring(workers, model["forward_bytes"], network)
    update = forward + steps * step
    return {
        "workers": workers,
        "minibatch": batch * workers if per_worker else batch,
        "step_s": step,
        "update_s": update,
        "round_cloud_s": update + model["evaluation_s"],
        "speedup": one / update,
        "efficiency": one / (workers * update),
    }


def _real_update(config: Any, workers: int, work_dir: Path) -> dict[str, float]:
    """One dccl round with `cloud.workers = workers` on the embedded Ray; the round's cloud-update time."""
    out = work_dir / f"workers={workers}"
    settings = {**config.model_dump(mode="json")}
    settings["cloud"]["workers"] = workers
    settings["output"] |= {"out_dir": str(out), "overwrite": True, "progress": False}
    settings["runtime"]["backend"] = "ray"
    run(type(config).model_validate(settings))
    record = pq.read_table(out / "rounds.parquet").to_pylist()[0]
    return {"workers": workers, "t_distill_s": record["t_distill_s"], "cloud_workers": record["cloud_workers"]}
