"""A simulation spread over a Ray cluster of several nodes on this machine equals a single-node run.

The cluster is four `ray start --block` processes, as on a real cluster: a head with no CPUs (the driver) and three
workers with one CPU each. The cloud's worker takes one CPU, so the two device packs (one CPU each) can only run on
the two other workers; the driver also asks each actor for its node id. Token authentication is on for
every node and the driver (`RAY_AUTH_MODE=token`, a fresh token in a file named by `RAY_AUTH_TOKEN_PATH`), which
is what Ray 2.60 needs: a head started without `RAY_AUTH_MODE` turns token auth on by itself when
`~/.ray/auth_token` exists, and then workers and drivers without `RAY_AUTH_MODE=token` are refused.

The drivers run in subprocesses (this file run as a script, and `dccl-sim run --address`), never in pytest's own
process: the rest of the suite shares one embedded Ray there (`ray_session`), a process holds one Ray connection
at a time, and a separate driver joining by address is how the cluster is used for real. Nothing here touches
this process's environment or `~/.ray`. Each node gets its own `--temp-dir`, so no other `ray.init()` on this
machine finds this cluster, and the teardown ends exactly the processes it started (never `ray stop`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from test_runtime import SMALL, assert_same_results, small_config

from dccl_sim.runtime.ray_runtime import RayRuntime
from dccl_sim.runtime.session import run

BIN = Path(sys.executable).parent
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NUM_WORKERS = 3
START_TIMEOUT_S = 120
RUN_TIMEOUT_S = 300


@dataclass
class LocalCluster:
    address: str
    env: dict[str, str]
    root: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_node(cluster: LocalCluster, name: str, *args: str) -> None:
    log = open(cluster.root / f"{name}.log", "w")  # noqa: SIM115 - the node writes it until teardown
    command = [str(BIN / "ray"), "start", *args, f"--temp-dir={cluster.root / name}"]
    command += ["--object-store-memory=100000000", "--disable-usage-stats", "--block"]
    cluster.processes[name] = subprocess.Popen(
        command, env=cluster.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    log.close()


def _wait_started(cluster: LocalCluster, names: list[str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    pending = set(names)
    while pending:
        pending = {n for n in pending if "Ray runtime started" not in (cluster.root / f"{n}.log").read_text()}
        dead = [name for name, process in cluster.processes.items() if process.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(
                f"Ray nodes did not start (exited: {dead}, waiting for {sorted(pending)}):\n{cluster.logs()}"
            )
        time.sleep(0.5)


def _stop(cluster: LocalCluster) -> None:
    """SIGTERM each `ray start --block` (it stops its node's processes), then SIGKILL what is left of its group."""
    for process in cluster.processes.values():
        if process.poll() is None:
            process.terminate()
    for process in cluster.processes.values():
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        with suppress(ProcessLookupError):  # the group this test created for the node (start_new_session)
            os.killpg(process.pid, signal.SIGKILL)


@contextmanager
def local_cluster(num_workers: int = NUM_WORKERS) -> Iterator[LocalCluster]:
    """A head (0 CPUs) and `num_workers` workers (1 CPU each) on this machine, with token auth; always torn down."""
    root = Path(tempfile.mkdtemp(prefix="dccl-mn-"))  # short: Ray's socket paths live under it
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
    port = _free_port()
    cluster = LocalCluster(address=f"127.0.0.1:{port}", env=env, root=root)
    try:
        _start_node(cluster, "head", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false")
        _wait_started(cluster, ["head"])
        workers = [f"worker{i}" for i in range(num_workers)]
        for name in workers:
            _start_node(cluster, name, f"--address={cluster.address}", "--num-cpus=1")
        _wait_started(cluster, workers)
        yield cluster
    finally:
        _stop(cluster)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with local_cluster() as running:
        yield running


@pytest.fixture(scope="module")
def single_node_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    run(small_config(out, "runtime.num_actors=2", "runtime.backend=local"))
    return out


def _check(result: subprocess.CompletedProcess, cluster: LocalCluster) -> None:
    assert result.returncode == 0, f"{result.args[:3]} failed:\n{result.stdout[-6000:]}\n{cluster.logs()}"


def test_a_run_spread_over_nodes_equals_a_single_node_run(
    cluster: LocalCluster, single_node_run: Path, tmp_path: Path
) -> None:
    out, report = tmp_path / "multinode", tmp_path / "placement.json"
    command = [sys.executable, __file__, cluster.address, str(out), str(report)]
    result = subprocess.run(
        command, env=cluster.env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )
    _check(result, cluster)
    placement = json.loads(report.read_text())
    workers = {node for node, cpus in placement["nodes"].items() if cpus == 1}
    assert len(placement["nodes"]) == 1 + NUM_WORKERS and len(workers) == NUM_WORKERS
    (cloud,) = placement["cloud"]
    packs = placement["packs"]
    assert len(set(packs)) == len(packs) == 2 and set(packs) <= workers, "each device pack on its own worker node"
    assert cloud in workers and cloud not in packs, "the cloud on a CPU of its own"
    assert_same_results(single_node_run, out)


def test_cloud_workers_on_separate_nodes_learn_what_one_worker_does(
    cluster: LocalCluster, single_node_run: Path, tmp_path: Path
) -> None:
    """`cloud.workers = 3` on the cluster: a worker on each node (the placement group spreads them), joined over
    TCP by gloo; the run equals the single-process one (1e-5) and records that three workers trained it."""
    out, report = tmp_path / "workers", tmp_path / "placement.json"
    command = [sys.executable, __file__, cluster.address, str(out), str(report), "cloud.workers=3"]
    result = subprocess.run(
        command, env=cluster.env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )
    _check(result, cluster)
    placement = json.loads(report.read_text())
    assert len(set(placement["cloud"])) == 3, "one cloud worker per node"
    assert pq.read_table(out / "rounds.parquet")["cloud_workers"].to_pylist() == [3, 3]
    assert_same_results(single_node_run, out)


def test_the_cli_joins_the_cluster_by_address(cluster: LocalCluster, single_node_run: Path, tmp_path: Path) -> None:
    settings = [arg for s in [*SMALL, "runtime.num_actors=2"] for arg in ("--set", s)]
    command = [str(BIN / "dccl-sim"), "run", "--address", cluster.address, *settings, "--out", str(tmp_path / "cli")]
    result = subprocess.run(
        command, env=cluster.env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )
    _check(result, cluster)
    assert "done: 2 rounds" in result.stdout
    assert_same_results(single_node_run, tmp_path / "cli")


def test_a_lost_node_loses_its_devices_for_a_round_and_the_run_goes_on(tmp_path: Path) -> None:
    """The raylet of a worker node holding a device pack is killed mid-round (its own cluster: the node stays dead):
    the round finishes without that pack's devices (`n_failed`), the pack gets a new actor on a surviving node and
    the next round has every device again."""
    out, report = tmp_path / "lost", tmp_path / "placement.json"
    with local_cluster() as cluster:
        command = [sys.executable, __file__, cluster.address, str(out), str(report), "kill-raylet", "rounds=3"]
        result = subprocess.run(
            command, env=cluster.env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
        )
        _check(result, cluster)
    rounds = pq.read_table(out / "rounds.parquet").to_pydict()
    # pack 0's devices (packs balance the devices' samples, so not necessarily half of the 8)
    lost = rounds["failed_devices"][0]
    assert rounds["n_failed"] == [1, 0, 0] and 0 < lost < 8 and rounds["failed_devices"] == [lost, 0, 0]
    assert rounds["n_participants"] == [8 - lost, 8, 8] and rounds["n_stragglers"] == [lost, 0, 0]


def test_a_plugin_strategy_reaches_every_node(
    cluster: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dccl-sim run --address` with a user's strategy from a folder on the driver's PYTHONPATH only (not the
    nodes', not the current directory): the actors on the worker nodes import it from the module shipped with the
    runtime environment, and the run equals the in-process one."""
    plugins = tmp_path / "my_plugins"
    plugins.mkdir()
    shutil.copy(EXAMPLES / "fedprox.py", plugins / "fedprox.py")
    workdir = tmp_path / "work"
    workdir.mkdir()
    plugin = ["strategy=fedprox:FedProx", "fedprox.mu=0.1", "runtime.torch_threads=1"]
    settings = [arg for s in [*SMALL, "runtime.num_actors=2", *plugin] for arg in ("--set", s)]
    command = [str(BIN / "dccl-sim"), "run", "--address", cluster.address, *settings, "--out", str(tmp_path / "cli")]
    env = {**cluster.env, "PYTHONPATH": str(plugins)}
    result = subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )
    _check(result, cluster)
    assert "done: 2 rounds" in result.stdout
    from bench.common import torch_threads  # not at the top: this file also runs as a script, without experiments/

    monkeypatch.syspath_prepend(str(plugins))
    with torch_threads(1):  # the actors' arithmetic: Adam on whole-model copies carries float order into W
        run(small_config(tmp_path / "local", "runtime.backend=local", "runtime.num_actors=2", *plugin))
    assert_same_results(tmp_path / "local", tmp_path / "cli")


def _node_id(_actor: object) -> str:
    return ray.get_runtime_context().get_node_id()


class PlacementRecorder(RayRuntime):
    """The Ray runtime, writing to `report` on which node the CloudActor and each DeviceActor run."""

    def __init__(self, address: str, report: Path) -> None:
        super().__init__(address=address)
        self.report = report

    def start(self, config, dataset_root, packs) -> None:
        super().start(config, dataset_root, packs)
        where = ray.get([actor.__ray_call__.remote(_node_id) for actor in [*self._cloud, *self._packs]])
        nodes = {n["NodeID"]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]}
        clouds = len(self._cloud)
        self.report.write_text(json.dumps({"cloud": where[:clouds], "packs": where[clouds:], "nodes": nodes}))


def _raylet_pid(_actor: object) -> int:
    return os.getppid()  # a Ray worker process is the child of its node's raylet


class RayletKiller(PlacementRecorder):
    """Kills (SIGKILL) the raylet of device pack 0's node right after round 0's task is submitted to the pack: the
    node is lost mid-round, with the pack's actor and everything else Ray ran there."""

    raylet: int | None = None

    def start(self, config, dataset_root, packs) -> None:
        super().start(config, dataset_root, packs)
        self.raylet = ray.get(self._packs[0].__ray_call__.remote(_raylet_pid))  # asked before any round's task

    def _submit(self, index, handle):
        ref = super()._submit(index, handle)
        if index == 0 and self.raylet is not None:
            os.kill(self.raylet, signal.SIGKILL)
            self.raylet = None
        return ref


def drive(address: str, out: Path, report: Path, *overrides: str) -> None:
    """The driver: join the cluster at `address`, run the small simulation (with `overrides`), write where each
    actor ran. The override `kill-raylet` kills pack 0's node in round 0 (`RayletKiller`)."""
    killing = "kill-raylet" in overrides
    overrides = tuple(o for o in overrides if o != "kill-raylet")
    runtime = (RayletKiller if killing else PlacementRecorder)(address, report)
    deadline = time.monotonic() + START_TIMEOUT_S
    while runtime.num_cpus < NUM_WORKERS:  # joins through RayRuntime; waits until every worker has registered
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {runtime.num_cpus} CPUs in the cluster at {address}")
        time.sleep(0.5)
    run(small_config(out, "runtime.num_actors=2", *overrides), runtime=runtime)


if __name__ == "__main__":
    drive(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), *sys.argv[4:])
