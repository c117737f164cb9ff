"""Part 5's ClientApp and the device step it shares with dccl-sim's packed run (`bench/flower_sim.py` measures them).

A module of its own, not `__main__`, so that Ray's workers import it by name: each Flower actor then keeps one
`DeviceHost` (every device's data, read on its first message) for all the messages it serves.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from bench.common import bench_config
from dccl_sim.algorithms.metapatch_step import PatchStepResult, metapatch_device_step
from dccl_sim.algorithms.protocol import Broadcast
from dccl_sim.context import RoundContext
from dccl_sim.hosts.device import DeviceHost


def device_step(host: DeviceHost, broadcast: Broadcast, ids: np.ndarray) -> PatchStepResult:
    """What a device does with the round's broadcast: load it, z_0 of its local samples, its meta-patch step."""
    host.load(broadcast)
    local = host.local_samples(ids, broadcast.round)
    samples = host.patch_samples(ids, local)
    # the dccl strategy's starting meta-patches: the broadcast payload's rows of these devices
    theta_start = host.strategy.start_theta(broadcast, ids)
    ctx = RoundContext(host.config, broadcast.round, broadcast.participants)
    return metapatch_device_step(host.models.cloud, host.models.patch, samples, theta_start, host.config.device, ctx)


# --- the broadcast as Flower carries it -------------------------------------------------------------------------


def broadcast_record(broadcast: Broadcast) -> ArrayRecord:
    """W, G and the participants' ids and starting meta-patches, as one ArrayRecord (the same for every node)."""
    if broadcast.patch_state is None or not isinstance(broadcast.payload, np.ndarray):
        raise ValueError("the dccl broadcast carries a patch generator and starting meta-patches")
    arrays = {f"model/{name}": Array(value) for name, value in broadcast.model_state.items()}
    arrays |= {f"patch/{name}": Array(value) for name, value in broadcast.patch_state.items()}
    arrays["participants"] = Array(broadcast.participants)
    arrays["start_theta"] = Array(broadcast.payload)  # dccl's payload: θ̃ of the participants, [P, k]
    return ArrayRecord(arrays)


def broadcast_of(record: ArrayRecord, round_index: int) -> Broadcast:
    def state(prefix: str) -> dict[str, np.ndarray]:
        return {key.removeprefix(prefix): record[key].numpy() for key in record if key.startswith(prefix)}

    return Broadcast(
        round=round_index,
        participants=record["participants"].numpy(),
        model_state=state("model/"),
        patch_state=state("patch/"),
        payload=record["start_theta"].numpy(),
    )


# --- the ClientApp ----------------------------------------------------------------------------------------------

_HOST: dict[tuple[Any, ...], DeviceHost] = {}  # per actor process: every device's data, read on the first message


def actor_host(overrides: Sequence[str], root: str, devices: int) -> DeviceHost:
    key = (tuple(overrides), root, devices)
    if key not in _HOST:
        _HOST.clear()
        config = bench_config(devices, overrides)
        _HOST[key] = DeviceHost(config, root, np.arange(devices, dtype=np.int64))
    return _HOST[key]


client_app = ClientApp()


@client_app.train()
def train(message: Message, context: Context) -> Message:
    """One device's step: its id is the node's partition id."""
    tic = time.perf_counter()
    setting = message.content["setting"]
    device = int(context.node_config["partition-id"])
    host = actor_host(list(setting["overrides"]), str(setting["root"]), int(setting["devices"]))
    loaded = time.perf_counter()
    broadcast = broadcast_of(message.content["broadcast"], int(setting["round"]))
    step = device_step(host, broadcast, np.array([device], dtype=np.int64))
    metrics = {
        "device": device,
        "gate_passed": int(step.gate_passed[0]),
        "compute_s": time.perf_counter() - loaded,
        "load_s": loaded - tic,
        "pid": os.getpid(),
        "torch_threads": torch.get_num_threads(),
    }
    content = RecordDict({"theta": ArrayRecord({"theta": Array(step.theta.numpy())}), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=message)
