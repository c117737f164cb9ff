"""The Ray runtime: a CloudActor and DeviceActors wrapping the plain hosts (docs/design.md §5).

The cloud's broadcast is the return value of one actor call, so it lands in the object store once and every
pack reads it by reference (NumPy arrays zero-copy on a node). Results come back in completion order through
`ray.wait`, under an optional wall-clock deadline. A pack whose actor dies is reported as failed for the round;
Ray restarts the actor, which reloads its devices from Parquet (their meta-patches come from the cloud).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import numpy as np
import ray
from ray.exceptions import AuthenticationError, RayActorError, RayTaskError

from dccl_sim import metrics, plugins
from dccl_sim.algorithms.protocol import PackResult
from dccl_sim.config import SimConfig
from dccl_sim.hosts.cloud import CloudHost, DeviceInfo, ModelCost
from dccl_sim.hosts.device import DeviceHost
from dccl_sim.progress import Progress
from dccl_sim.runtime.base import DevicePhase, Runtime

# two threads: a progress() call is answered while pretrain() runs (the driver makes no other concurrent calls)
CloudActor = ray.remote(num_cpus=0, max_concurrency=2)(CloudHost)
PROGRESS_POLL_S = 0.5
RESTART_WAIT_S = 600.0  # a restarted actor reloads its devices' data before it answers
DeviceActor = ray.remote(max_restarts=-1, max_task_retries=0)(DeviceHost)


class RuntimeStartError(RuntimeError):
    """Ray could not be started or joined; the message says why and what to try."""


def check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """Fail fast on a `host:port` (or `ray://host:port`) address nobody listens on."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RuntimeStartError(f"Ray address {address!r} is not of the form host:port")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as error:
        raise RuntimeStartError(
            f"cannot reach a Ray cluster at {address} ({error}); start one with `ray start --head` or drop --address "
            "to run on an embedded local Ray"
        ) from None


def _largest_node_cpus() -> int:
    return max([int(node["Resources"].get("CPU", 1)) for node in ray.nodes() if node["Alive"]] or [1])


def plugin_specs(config: SimConfig) -> list[str]:
    """The `module:Attribute` plug-ins a config names (strategy, model, data source)."""
    specs = [config.strategy, getattr(config.model, "name", ""), config.data.source]
    return [spec for spec in specs if plugins.is_reference(spec)]


def upload_plugins(config: SimConfig) -> list[str]:
    """Upload the user's plug-in modules to the cluster's object store; returns their URIs for an actor's
    runtime_env `py_modules`, so every actor, on any node, imports them. An actor's runtime_env takes only URIs
    (local paths are uploaded by `ray.init`, which may have run before this config existed): Ray's own uploader
    makes them, the one `ray.init` uses (ray is pinned, see pyproject.toml)."""
    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed

    modules = plugins.shipped_modules(plugin_specs(config))
    if not modules:
        return []
    return upload_py_modules_if_needed({"py_modules": modules}, include_gitignore=True)["py_modules"]


def actor_env(threads: int, modules: list[str]) -> dict:
    """The actors' runtime_env: OpenMP started with the threads torch will use (Ray starts an actor below one CPU
    with OMP_NUM_THREADS=1, which slows the cloud's multi-threaded training) and the plug-in modules' URIs."""
    env: dict = {"env_vars": {"OMP_NUM_THREADS": str(threads)}}
    if modules:
        env["py_modules"] = modules
    return env


class _RemoteCloud:
    """The cloud actor behind the `Cloud` interface: each call waits for its value."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor

    def pretrain(self, cache_dir: str | None, on_progress: Progress | None = None) -> dict[str, float]:
        """Waits for pretraining, asking the actor (a second thread of it) how far it is every half second."""
        done = self._actor.pretrain.remote(cache_dir)
        while on_progress is not None and not ray.wait([done], timeout=PROGRESS_POLL_S)[0]:
            stage, batches, total = ray.get(self._actor.progress.remote())
            if total:
                on_progress(stage, batches, total)
        return ray.get(done)

    def load_state(self, state: dict[str, object]) -> None:
        ray.get(self._actor.load_state.remote(state))

    def device_info(self) -> DeviceInfo:
        return ray.get(self._actor.device_info.remote())

    def model_cost(self) -> ModelCost:
        return ray.get(self._actor.model_cost.remote())

    def device_counts(self, round_index: int) -> dict[str, np.ndarray]:
        return ray.get(self._actor.device_counts.remote(round_index))

    def update(self, round_index: int, participants: np.ndarray, results: list[PackResult]) -> dict[str, float]:
        return ray.get(self._actor.update.remote(round_index, participants, results))

    def evaluate(self) -> metrics.Evaluation:
        return ray.get(self._actor.evaluate.remote())

    def state(self) -> dict[str, object]:
        return ray.get(self._actor.state.remote())


class RayRuntime(Runtime):
    """Runs the roles as Ray actors: embedded local Ray by default, or an existing cluster at `address`."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        self.address = address if address is not None else os.environ.get("RAY_ADDRESS")
        self._requested_cpus = num_cpus
        self._started_ray = False
        self._cloud = None
        self._packs: list[Any] = []
        self._restarting: set[int] = set()  # packs whose actor died in the last device phase

    def _init_ray(self) -> None:
        if self.address:
            check_reachable(self.address)
        if ray.is_initialized():
            return
        if self.address:
            try:
                ray.init(address=self.address, log_to_driver=True)
            except (AuthenticationError, ConnectionError) as error:
                raise RuntimeStartError(
                    f"could not join the Ray cluster at {self.address}: {error}. A cluster with token authentication "
                    "needs `export RAY_AUTH_MODE=token` (and its token) for the driver too; see cluster/GUIDE.md"
                ) from None
        else:
            # address="local": always a new embedded instance, never a `ray start` cluster found on this machine
            ray.init(
                address="local",
                num_cpus=self._requested_cpus or os.cpu_count(),
                include_dashboard=False,
                log_to_driver=True,
            )
        self._started_ray = True

    @property
    def num_cpus(self) -> int:
        self._init_ray()
        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    def start(self, config: SimConfig, dataset_root: str, packs: list[np.ndarray]) -> None:
        self._init_ray()
        cpus = self.num_cpus
        share = cpus / len(packs)
        threads = config.runtime.torch_threads or max(1, int(share))
        # the cloud asks Ray for no CPU (it works while the devices wait) and uses as many threads as the largest
        # node has CPUs: Ray would otherwise pin the actor's torch to one thread
        cloud_threads = config.runtime.torch_threads or _largest_node_cpus()
        modules = upload_plugins(config)
        self._cloud = CloudActor.options(runtime_env=actor_env(cloud_threads, modules)).remote(
            config, dataset_root, cloud_threads
        )
        # packs are contiguous id ranges; a `range` keeps the constructor arguments tiny, so a restarted actor
        # never depends on a large argument still being in the object store
        self._packs = [
            DeviceActor.options(num_cpus=share, runtime_env=actor_env(threads, modules)).remote(
                config, dataset_root, range(ids[0], ids[-1] + 1), threads
            )
            for ids in packs
        ]

    @property
    def cloud(self) -> _RemoteCloud:
        return _RemoteCloud(self._cloud)

    def broadcast(self, round_index: int, participants: np.ndarray) -> Any:
        return self._cloud.broadcast.remote(round_index, participants)

    def run_devices(self, handle: Any, packs: list[int], deadline_s: float | None) -> DevicePhase:
        phase = DevicePhase()
        self._await_restarts()
        pending = {self._submit(index, handle): index for index in packs}
        start = time.perf_counter()
        first = None
        while pending:
            timeout = None if deadline_s is None else max(0.0, deadline_s - (time.perf_counter() - start))
            done, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            if not done:
                phase.late_packs.extend(pending.values())
                break
            ref = done[0]
            index = pending.pop(ref)
            first = first if first is not None else time.perf_counter()
            try:
                phase.results.append(ray.get(ref))
            except (RayActorError, RayTaskError) as error:
                if isinstance(error, RayTaskError) and not isinstance(error.cause, RayActorError):
                    raise
                phase.failed_packs.append(index)
                self._restarting.add(index)
        phase.gather_s = time.perf_counter() - first if first is not None else 0.0
        return phase

    def _await_restarts(self) -> None:
        """Wait until the actors that died last round are back: Ray rejects calls to a restarting actor at once
        (at-most-once tasks), which would lose the pack for a second round."""
        deadline = time.perf_counter() + RESTART_WAIT_S
        for index in sorted(self._restarting):
            while True:
                try:
                    ray.get(self._packs[index].ready.remote())
                    break
                except RayActorError:
                    if time.perf_counter() > deadline:
                        break  # still down: this round reports the pack as failed again
                    time.sleep(0.2)
        self._restarting.clear()

    def _submit(self, index: int, handle: Any) -> Any:
        return self._packs[index].train_round.remote(handle)

    def kill_pack(self, index: int) -> None:
        """Kill a pack's actor (fault injection); Ray restarts it."""
        ray.kill(self._packs[index], no_restart=False)

    def shutdown(self) -> None:
        for actor in [self._cloud, *self._packs]:
            if actor is not None:
                ray.kill(actor)
        self._cloud, self._packs = None, []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
