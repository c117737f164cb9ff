"""Part 4, broadcast cost: the bytes of one round's broadcast and the time until every device actor holds it.

The cloud actor builds the broadcast (`CloudHost.broadcast` through `CloudActor`, as the round loop does) and Ray
stores it once; then each of A stand-in device actors (`receiver.Receiver`) gets the reference as an argument,
which Ray resolves to the value (NumPy arrays read zero-copy from the object store, which holds one copy per
node), and reads every array. `deliver_s` is the time from submitting those calls to the last one returning,
`empty_call_s` the same for calls without the broadcast: `receive_s`, their difference, is what receiving adds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray

from bench.common import bench_config, pretrain_cache, ray_started
from bench.receiver import Receiver
from dccl_sim.algorithms.protocol import Broadcast
from dccl_sim.data.prepare import prepare_dataset
from dccl_sim.data.store import read_meta
from dccl_sim.runtime.ray_runtime import CloudActor

ReceiverActor = ray.remote(Receiver)


def measure(devices: int, actor_counts: Sequence[int], overrides: Sequence[str], repeats: int) -> dict[str, Any]:
    config = bench_config(devices, overrides)
    root = prepare_dataset(config.data, config.seed)
    participants = np.arange(read_meta(root).num_devices, dtype=np.int64)
    with ray_started() as cpus:
        cloud = CloudActor.remote(config, root, 1)
        try:
            ray.get(cloud.pretrain.remote(pretrain_cache(config)))
            model_bytes = _model_and_patch_bytes(ray.get(cloud.broadcast.remote(0, participants)))
            rows = [_deliver(cloud, participants, actors, cpus, repeats) for actors in actor_counts]
        finally:
            ray.kill(cloud)
    return {
        "devices": len(participants),
        "strategy": config.strategy,
        "model_and_patch_bytes": model_bytes,
        "measurements": rows,
    }


def _model_and_patch_bytes(broadcast: Broadcast) -> int:
    """`Broadcast.nbytes` less dccl's payload, the participants' starting meta-patches (per participant, like
    their ids: `bytes_per_actor` counts them); a CoDA payload (candidates) stays counted, as it always was."""
    per_participant = broadcast.payload.nbytes if isinstance(broadcast.payload, np.ndarray) else 0
    return broadcast.nbytes - per_participant


def _deliver(cloud: Any, participants: np.ndarray, actors: int, cpus: int, repeats: int) -> dict[str, Any]:
    receivers = [ReceiverActor.options(num_cpus=cpus / actors).remote() for _ in range(actors)]
    try:
        ray.get([r.touch.remote(cloud.broadcast.remote(0, participants)) for r in receivers])  # start-up, imports
        build, deliver, empty = [], [], []
        received = 0
        for _ in range(repeats):  # each repeat a new broadcast object, as each round makes one
            tic = time.perf_counter()
            handle = cloud.broadcast.remote(0, participants)
            ray.wait([handle])
            built = time.perf_counter()
            received = ray.get([r.touch.remote(handle) for r in receivers])[0]
            delivered = time.perf_counter()
            ray.get([r.touch.remote(None) for r in receivers])
            build.append(built - tic)
            deliver.append(delivered - built)
            empty.append(time.perf_counter() - delivered)
    finally:
        for receiver in receivers:
            ray.kill(receiver)
    deliver_s, empty_s = float(np.median(deliver)), float(np.median(empty))
    return {
        "actors": actors,
        "bytes_per_actor": received,
        "build_s": float(np.median(build)),
        "deliver_s": deliver_s,
        "empty_call_s": empty_s,
        "receive_s": deliver_s - empty_s,
        "deliver_s_all": deliver,
    }
