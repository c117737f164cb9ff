"""Part 5's ClientApp and the device step it shares with dccl-sim's packed run (`bench/flower_sim.py` measures them).

A module of its own, not `__main__`, so that Ray's workers import it by name: each Flower actor then keeps one
`DeviceSide` (every device's data, read on its first message) for all the messages it serves.
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
from dccl_sim.algorithms.device_side import DeviceSide
from dccl_sim.algorithms.metapatch_step import PatchStepResult, metapatch_device_step
from dccl_sim.algorithms.protocol import Broadcast
from dccl_sim.runtime.roles import DeviceRole


def device_step(side: DeviceSide, broadcast: Broadcast, ids: np.ndarray) -> PatchStepResult:
    """What a device does with the round's broadcast: load it, z_0 of its local samples, its meta-patch step."""
    side.load(broadcast)
    local = side.local_samples(ids, broadcast.round)
    samples = side.patch_samples(ids, local)
    theta_start = broadcast.start_theta_of(ids, side.config.patch.k)
    config = side.config
    return metapatch_device_step(
        side.models.cloud, side.models.patch, samples, theta_start, config.device, config.seed, broadcast.round
    )


# --- the broadcast as Flower carries it -------------------------------------------------------------------------


def broadcast_record(broadcast: Broadcast) -> ArrayRecord:
    """W, G and the participants' ids and starting meta-patches, as one ArrayRecord (the same for every node)."""
    if broadcast.patch_state is None or broadcast.start_theta is None:
        raise ValueError("the dccl broadcast carries a patch generator and starting meta-patches")
    arrays = {f"model/{name}": Array(value) for name, value in broadcast.model_state.items()}
    arrays |= {f"patch/{name}": Array(value) for name, value in broadcast.patch_state.items()}
    arrays["participants"] = Array(broadcast.participants)
    arrays["start_theta"] = Array(broadcast.start_theta)
    return ArrayRecord(arrays)


def broadcast_of(record: ArrayRecord, round_index: int) -> Broadcast:
    def state(prefix: str) -> dict[str, np.ndarray]:
        return {key.removeprefix(prefix): record[key].numpy() for key in record if key.startswith(prefix)}

    return Broadcast(
        round=round_index,
        participants=record["participants"].numpy(),
        model_state=state("model/"),
        patch_state=state("patch/"),
        start_theta=record["start_theta"].numpy(),
    )


# --- the ClientApp ----------------------------------------------------------------------------------------------

_SIDE: dict[tuple[Any, ...], DeviceSide] = {}  # per actor process: every device's data, read on the first message


def actor_side(overrides: Sequence[str], root: str, devices: int) -> DeviceSide:
    key = (tuple(overrides), root, devices)
    if key not in _SIDE:
        _SIDE.clear()
        config = bench_config(devices, overrides)
        _SIDE[key] = DeviceRole(config, root, np.arange(devices, dtype=np.int64)).side
    return _SIDE[key]


client_app = ClientApp()


@client_app.train()
def train(message: Message, context: Context) -> Message:
    """One device's step: its id is the node's partition id."""
    tic = time.perf_counter()
    setting = message.content["setting"]
    device = int(context.node_config["partition-id"])
    side = actor_side(list(setting["overrides"]), str(setting["root"]), int(setting["devices"]))
    loaded = time.perf_counter()
    broadcast = broadcast_of(message.content["broadcast"], int(setting["round"]))
    step = device_step(side, broadcast, np.array([device], dtype=np.int64))
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
