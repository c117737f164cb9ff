"""Speed of the packed MetaPatch device step against a per-device loop of the same function (K = 1 calls).

Devices are ML-100K's users with their real round-t local samples (training windows up to t), cycled with fresh
device ids until there are `--devices` of them; z_0 is computed once under the pretrained cloud model, as in a
round. Both variants run `metapatch_device_step` and must agree to 1e-5.

    .venv/bin/python experiments/packed_speedup.py                      # 1,000 devices, 1 local epoch, no gate
    .venv/bin/python experiments/packed_speedup.py --set device.local_epochs=2 --set device.gate=true

Torch runs with one thread (`--threads`): on a small shared machine more threads oversubscribe the CPU and make
small matrix products orders of magnitude slower, which would flatter the packed step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

# internals on purpose: this measures the device step itself (`metapatch_device_step` on a device host's samples),
# which the public API only runs inside whole rounds
from dccl_sim import load_config
from dccl_sim.algorithms.metapatch_step import LocalSamples, metapatch_device_step
from dccl_sim.context import RoundContext
from dccl_sim.data.prepare import prepare_dataset
from dccl_sim.hosts.cloud import CloudHost
from dccl_sim.hosts.device import DeviceHost, RoundSamples

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "packed_speedup.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000, help="number of devices (default 1000)")
    parser.add_argument("--round", type=int, default=0, help="round whose local data the devices hold (default 0)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    parser.add_argument("--repeats", type=int, default=3, help="packed-step repetitions; the fastest counts")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def cycled(samples: LocalSamples, rows: np.ndarray, first_id: int) -> LocalSamples:
    """The devices `rows` of `samples` (repeats allowed), packed contiguously under fresh ids first_id, ..."""
    lengths = samples.ends[rows] - samples.starts[rows]
    index = np.concatenate([np.arange(samples.starts[r], samples.ends[r]) for r in rows])
    ends = np.cumsum(lengths)
    starts = ends - lengths
    return LocalSamples(
        z0=samples.z0[torch.from_numpy(index)],
        label=samples.label[torch.from_numpy(index)],
        starts=starts,
        ends=ends,
        holdout_start=starts + (samples.holdout_start[rows] - samples.starts[rows]),
        device_ids=np.arange(first_id, first_id + len(rows), dtype=np.int64),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = ["device.local_epochs=1", "device.gate=false", *args.overrides]
    config = load_config(None, ["strategy=metapatch", "runtime.backend=local", *overrides])
    root = prepare_dataset(config.data, config.seed)
    cloud = CloudHost(config, root)
    cloud.pretrain(str(config.data.cache_dir.expanduser() / "pretrained"))
    ids = np.arange(cloud.data.num_devices, dtype=np.int64)
    broadcast = cloud.broadcast(args.round, ids)
    host = DeviceHost(config, root, ids)
    host.load(broadcast)
    local: RoundSamples = host.local_samples(ids, args.round)
    tic = time.perf_counter()
    real = host.patch_samples(ids, local)
    z0_s = time.perf_counter() - tic
    rows = np.arange(args.devices) % len(ids)
    samples = cycled(real, rows, first_id=0)
    model, patch, device = host.models.cloud, host.models.patch, config.device
    start = torch.zeros(args.devices, config.patch.k)
    # the round's random streams; the cycled devices' fresh ids 0.. key their draws
    ctx = RoundContext(config, args.round, samples.device_ids)

    packed_times = []
    for _ in range(args.repeats):
        tic = time.perf_counter()
        packed = metapatch_device_step(model, patch, samples, start, device, ctx)
        packed_times.append(time.perf_counter() - tic)
    tic = time.perf_counter()
    looped = [
        metapatch_device_step(model, patch, samples.alone(m), start[m : m + 1], device, ctx)
        for m in range(args.devices)
    ]
    loop_s = time.perf_counter() - tic
    loop_theta = torch.cat([r.theta for r in looped])
    lengths = samples.ends - samples.starts
    result = {
        "devices": args.devices,
        "distinct_ml100k_users": len(ids),
        "round": args.round,
        "samples": int(lengths.sum()),
        "samples_per_device": {
            "min": int(lengths.min()),
            "median": float(np.median(lengths)),
            "max": int(lengths.max()),
        },
        "local_epochs": device.local_epochs,
        "batch_size": device.batch_size,
        "gate": device.gate,
        "patch_k": config.patch.k,
        "patch_rank": config.patch.rank,
        "packed_s": min(packed_times),
        "packed_s_all": packed_times,
        "loop_s": loop_s,
        "speedup": loop_s / min(packed_times),
        "max_abs_diff": float((packed.theta - loop_theta).abs().max()),
        "gate_agreement": bool(np.array_equal(packed.gate_passed, np.concatenate([r.gate_passed for r in looped]))),
        "z0_s_for_real_devices": z0_s,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "load_average_1m": os.getloadavg()[0],
        "overrides": overrides,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(
        f"{args.devices} devices, {result['samples']} samples, {device.local_epochs} local epoch(s), "
        f"gate {device.gate}: "
        f"packed {result['packed_s']:.2f} s, per-device loop {loop_s:.1f} s, speed-up {result['speedup']:.1f}×, "
        f"max |Δθ| {result['max_abs_diff']:.1e} (torch threads {result['threads']})"
    )
    print(f"wrote {args.out}")
    return 0 if result["max_abs_diff"] <= 1e-5 and result["gate_agreement"] else 1


if __name__ == "__main__":
    sys.exit(main())
