"""The Ray runtime: CloudActors and DeviceActors wrapping the plain hosts (docs/design.md §5).

The cloud's broadcast is the return value of one actor call, so it lands in the object store once and every
pack reads it by reference (NumPy arrays zero-copy on a node). Results come back in completion order through
`ray.wait`, under an optional wall-clock deadline. A pack whose actor dies is reported as failed for the round;
the runtime replaces the actor before the next round, and the new one reloads its devices from Parquet (their
meta-patches come from the cloud), on whichever node has room: after a node is lost, on the survivors.

The cloud is `cloud.workers` actors in a placement group (spread over nodes, a CPU each), joined in a gloo process
group: every call that changes the cloud (pretraining, the update, loading a checkpoint) goes to all of them with the
same arguments and they train data-parallel (docs/scale-out.md); what only reads it goes to worker 0.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
from ray.exceptions import AuthenticationError, RayActorError, RayTaskError
from ray.experimental import internal_kv
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from dccl_sim import metrics, plugins
from dccl_sim.algorithms.protocol import PackResult
from dccl_sim.config import SimConfig
from dccl_sim.hosts.cloud import CloudHost, DeviceInfo, ModelCost
from dccl_sim.hosts.device import DeviceHost
from dccl_sim.progress import Progress
from dccl_sim.runtime.base import DevicePhase, PackDone, Runtime
from dccl_sim.runtime.placement import pack_cpus

# one call at a time, every one on the actor's main thread, so torch's OpenMP keeps one team of threads: calls on
# several threads give each its own team, and libgomp, seeing more threads than cores, sleeps its workers between
# parallel regions (docs/scale-out.md). Progress during pretraining therefore travels through Ray's key-value store
CloudActor = ray.remote(CloudHost)
CLOUD_START_TIMEOUT_S = 300.0  # the placement group waits this long for the cloud workers' CPUs
PROGRESS_POLL_S = 0.5
DeviceActor = ray.remote(max_restarts=0, max_task_retries=0)(DeviceHost)
REPLACE_WAIT_S = 300.0  # how long a round waits for the new actors of packs lost in the last one
RELEASE_WAIT_S = 10.0  # how long a kept Ray's `shutdown` waits for the ended actors' CPUs (others may take them)


class RuntimeStartError(RuntimeError):
    """Ray could not be started or joined; the message says why and what to try."""


class CloudWorkerLost(RuntimeError):
    """A cloud worker died (its process or node is gone): the run stops; its finished rounds are kept."""


def check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """Fail fast, in milliseconds (`timeout_s` where nothing answers), on a `host:port` or `ray://host:port` address
    where this driver could not join a Ray cluster; `ray.init` would retry for 20 s, printing a warning a second.
    A head's `host:port` is its GCS, asked for its cluster id as `ray.init` asks: nobody listening, something else
    answering (a dashboard's port, a proxy) and a cluster refusing this driver's token are each told apart. A Ray
    Client address (`ray://`) is only checked for a listener."""
    if address == "auto":
        return
    scheme, _, hostport = address.rpartition("://")
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
    if not scheme:
        _ask_gcs(address, timeout_s)


def _ask_gcs(address: str, timeout_s: float) -> None:
    """Ask the GCS at `address` for its cluster id, with this driver's token as `ray.init` sends it (Ray's own gRPC
    stub and token interceptor: ray is pinned, see pyproject.toml)."""
    import grpc
    from ray._private.authentication.grpc_authentication_client_interceptor import (
        SyncAuthenticationMetadataClientInterceptor,
    )
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        gcs = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(
            grpc.intercept_channel(channel, SyncAuthenticationMetadataClientInterceptor())
        )
        try:
            gcs.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)
        except grpc.RpcError as error:
            code, details = error.code(), error.details()
        else:
            return
    if code == grpc.StatusCode.UNAUTHENTICATED:
        raise RuntimeStartError(
            f"the Ray cluster at {address} uses token authentication and refused this driver ({details}); "
            "`export RAY_AUTH_MODE=token` and give the cluster's token (RAY_AUTH_TOKEN, or ~/.ray/auth_token); see "
            "cluster/GUIDE.md"
        )
    raise RuntimeStartError(
        f"{address} answers, but is not a Ray cluster's head ({code.name.lower()}: {details}); give the head's "
        "address, which `ray start --head` prints (port 6379 unless changed; 8265 is the dashboard's)"
    )


def _node_cpus() -> dict[str, int]:
    return {n["NodeID"]: int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]}


def cloud_cpus_each(cluster_cpus: float, workers: int) -> float:
    """Ray CPUs each cloud worker reserves: one, or, when the cluster has fewer than two per worker, an equal share of
    half of them (the device packs keep the other half)."""
    return 1.0 if cluster_cpus >= 2 * workers else cluster_cpus / (2 * workers)


@ray.remote(num_cpus=0)
def _rendezvous() -> str:
    """Where the cloud workers meet: this node's address and a free port (run on worker 0's node)."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    return f"tcp://{ray.util.get_node_ip_address()}:{port}"


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


class _ProgressToStore:
    """A cloud worker's `on_progress` during pretraining: the latest (stage, done, total) into Ray's key-value store
    under `key`, at most twice per poll of the driver's, where the driver reads it."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._written = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._written >= PROGRESS_POLL_S / 2 or done == total:
            self._written = now
            internal_kv._internal_kv_put(self.key, json.dumps([stage, done, total]))


class _RemoteCloud:
    """The cloud's worker actors behind the `Cloud` interface: each call waits for its value. Calls that change the
    cloud go to every worker (their arguments put in the object store once); the others to worker 0."""

    def __init__(self, workers: list[Any]) -> None:
        self._workers = workers
        self._actor = workers[0]

    def _on_all(self, method: str, *args: Any, on_wait: Callable[[], None] | None = None) -> Any:
        """Call `method` on every worker; worker 0's value. A worker that dies stops the wait at once (the others
        would wait for it in their next all-reduce): `CloudWorkerLost`. `on_wait` is called every half second."""
        refs = [ray.put(a) if isinstance(a, (dict, list)) else a for a in args]
        calls = [getattr(w, method).remote(*refs) for w in self._workers]
        pending = list(calls)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=PROGRESS_POLL_S)
            for ref in done:
                try:
                    ray.get(ref)
                    continue
                except RayActorError:
                    rank = calls.index(ref)
                except RayTaskError:
                    # a survivor fails too once its peer's connection closes: name the worker that died
                    rank = _lost_worker(calls)
                    if rank is None:
                        raise
                raise CloudWorkerLost(
                    f"cloud worker {rank} of {len(calls)} died during {method} (its process or node is gone); "
                    "the finished rounds and their checkpoints are kept: `dccl-sim run --resume RUN_DIR` "
                    "continues from the last one"
                ) from None
            if pending and on_wait is not None:
                on_wait()
        return ray.get(calls[0])

    def pretrain(self, cache_dir: str | None, on_progress: Progress | None = None) -> dict[str, float]:
        """Waits for pretraining, reading how far it is from Ray's key-value store every half second (the workers,
        busy with it, answer no call meanwhile)."""
        if on_progress is None:
            return self._on_all("pretrain", cache_dir)
        reporter = _ProgressToStore(f"dccl-sim:progress:{os.getpid()}:{time.time_ns()}")

        def report() -> None:
            latest = internal_kv._internal_kv_get(reporter.key)
            if latest:
                on_progress(*json.loads(latest))

        try:
            done = self._on_all("pretrain", cache_dir, reporter, on_wait=report)
            report()  # the last step's end, written after the last poll
            return done
        finally:
            internal_kv._internal_kv_del(reporter.key)

    def load_state(self, state: dict[str, object]) -> None:
        self._on_all("load_state", state)

    def device_info(self) -> DeviceInfo:
        return ray.get(self._actor.device_info.remote())

    def model_cost(self) -> ModelCost:
        return ray.get(self._actor.model_cost.remote())

    def device_counts(self, round_index: int) -> dict[str, np.ndarray]:
        return ray.get(self._actor.device_counts.remote(round_index))

    def update(self, round_index: int, participants: np.ndarray, results: list[PackResult]) -> dict[str, float]:
        return self._on_all("update", round_index, participants, results)

    def evaluate(self) -> metrics.Evaluation:
        return ray.get(self._actor.evaluate.remote())

    def state(self) -> dict[str, object]:
        return ray.get(self._actor.state.remote())


def _constructed(_actor: object) -> bool:
    """Answers once an actor is constructed (a pack: its devices loaded)."""
    return True


def _lost_worker(calls: list[Any], wait_s: float = 10.0) -> int | None:
    """The rank of a worker whose call ended with its actor's death (waiting up to `wait_s` for the calls to end),
    or None when none died."""
    done, _ = ray.wait(calls, num_returns=len(calls), timeout=wait_s)
    for ref in done:
        try:
            ray.get(ref)
        except RayActorError:
            return calls.index(ref)
        except RayTaskError:
            continue
    return None


class RayRuntime(Runtime):
    """Runs the roles as Ray actors: embedded local Ray by default, or an existing cluster at `address`."""

    def __init__(
        self, address: str | None = None, num_cpus: int | None = None, verbose: bool = False, keep_ray: bool = False
    ) -> None:
        """`verbose`: Ray's own INFO and WARNING lines too (only its errors otherwise: a user cannot act on them).
        `keep_ray`: `shutdown()` ends the run's actors but leaves the Ray it started (or joined) running for the next
        run on this runtime, as a sweep's points do; `close()` stops it."""
        self.address = address if address is not None else os.environ.get("RAY_ADDRESS")
        self._log_level = logging.INFO if verbose else logging.ERROR
        self._requested_cpus = num_cpus
        self._keep_ray = keep_ray
        self._idle_cpus = 0.0  # CPUs free before `start` made this run's actors: what `shutdown` waits to see again
        self._started_ray = False
        self._added_cpus = 0  # CPUs an embedded Ray counts beyond the cores, for the cloud's reservation
        self._cloud: list[Any] = []
        self._cloud_group: Any = None  # the cloud workers' placement group
        self._packs: list[Any] = []
        self._lost: set[int] = set()  # packs whose actor died in the last device phase
        self._new_pack: Callable[[int, float], Any] | None = None  # a pack's actor, made anew

    def _init_ray(self, cloud_workers: int = 1) -> None:
        """Join the cluster at `address`, or start an embedded Ray whose CPUs are this machine's cores plus one per
        cloud worker: on one machine the cloud computes while the devices wait, so its reservation takes no core
        from the device packs."""
        self.check()
        if ray.is_initialized():
            self.session_name = ray.get_runtime_context().get_session_name()
            return
        if self.address:
            try:
                ray.init(address=self.address, log_to_driver=True, logging_level=self._log_level)
            except (AuthenticationError, ConnectionError) as error:
                raise RuntimeStartError(
                    f"could not join the Ray cluster at {self.address}: {error}. A cluster with token authentication "
                    "needs `export RAY_AUTH_MODE=token` (and its token) for the driver too; see cluster/GUIDE.md"
                ) from None
        else:
            # address="local": always a new embedded instance, never a `ray start` cluster found on this machine
            ray.init(
                address="local",
                num_cpus=(self._requested_cpus or os.cpu_count() or 1) + cloud_workers,
                include_dashboard=False,
                log_to_driver=True,
                logging_level=self._log_level,
            )
        self._started_ray = True
        self._added_cpus = 0 if self.address else cloud_workers
        self.session_name = ray.get_runtime_context().get_session_name()

    def check(self) -> None:
        """A Ray cluster answers at `address`, when one is given (`check_reachable`)."""
        if self.address:
            check_reachable(self.address)

    @property
    def num_cpus(self) -> int:
        self._init_ray()
        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    def cloud_workers(self, config: SimConfig) -> int:
        """`cloud.workers`, `auto` resolved: one per node with CPUs (one on an embedded Ray)."""
        if config.cloud.workers != "auto":
            return config.cloud.workers
        if not ray.is_initialized() and not self.address:
            return 1
        self._init_ray()
        return max(1, sum(1 for cpus in _node_cpus().values() if cpus > 0))

    def resolve(self, config: SimConfig) -> SimConfig:
        if config.cloud.workers != "auto":
            return config
        cloud = config.cloud.model_copy(update={"workers": self.cloud_workers(config)})
        return config.model_copy(update={"cloud": cloud})

    def device_cpus(self, config: SimConfig) -> int:
        workers = self.cloud_workers(config)
        self._init_ray(workers)
        cpus = float(ray.cluster_resources().get("CPU", 1))
        return max(1, int(cpus - workers * cloud_cpus_each(cpus, workers)))

    def start(self, config: SimConfig, dataset_root: str, packs: list[np.ndarray]) -> None:
        workers = self.cloud_workers(config)
        self._init_ray(workers)
        cpus = float(ray.cluster_resources().get("CPU", 1))
        self._idle_cpus = float(ray.available_resources().get("CPU", 0.0))
        cloud_cpus = cloud_cpus_each(cpus, workers)
        # a pack's threads come from all the cores (the cloud's are idle while the devices train); its reservation
        # from the CPUs the cloud leaves
        threads = config.runtime.torch_threads or max(1, int((cpus - self._added_cpus) / len(packs)))
        modules = upload_plugins(config)
        cloud_nodes = self._start_cloud(config, dataset_root, workers, cloud_cpus, modules)
        free = [cpus - cloud_cpus * cloud_nodes.count(node) for node, cpus in _node_cpus().items()]
        self._pack_cpus = pack_cpus(free, len(packs))
        # packs are contiguous id ranges; a `range` keeps the constructor arguments tiny, so a replacement actor
        # never depends on a large argument still being in the object store
        ranges = [range(ids[0], ids[-1] + 1) for ids in packs]

        def new_pack(index: int, cpus: float) -> Any:
            options = DeviceActor.options(num_cpus=cpus, runtime_env=actor_env(threads, modules))
            return options.remote(config, dataset_root, ranges[index], threads)

        self._new_pack = new_pack
        self._packs = [new_pack(index, self._pack_cpus) for index in range(len(packs))]

    def _start_cloud(
        self, config: SimConfig, dataset_root: str, workers: int, cpus_each: float, modules: list[str]
    ) -> list[str]:
        """The cloud's workers, spread over nodes by a placement group, each with as many torch threads as its node
        has CPUs for it (Ray would otherwise pin an actor's torch to its reservation), joined in a process group.
        Returns the node of each worker."""
        group = placement_group([{"CPU": cpus_each}] * workers, strategy="SPREAD")
        if not ray.wait([group.ready()], timeout=CLOUD_START_TIMEOUT_S)[0]:
            remove_placement_group(group)
            raise RuntimeStartError(
                f"cloud.workers = {workers} needs {cpus_each:g} CPU each from Ray, which the cluster did not grant in "
                f"{CLOUD_START_TIMEOUT_S:.0f} s; lower cloud.workers or add nodes"
            )
        self._cloud_group = group
        node_of = placement_group_table(group)["bundles_to_node_id"]
        sharing = Counter(node_of.values())
        node_cpus = _node_cpus()
        self._cloud = []
        for rank in range(workers):
            node = node_of[rank]
            cores = node_cpus.get(node, 1) - self._added_cpus
            threads = config.runtime.torch_threads or max(1, cores // sharing[node])
            where = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)
            self._cloud.append(
                CloudActor.options(
                    num_cpus=cpus_each, scheduling_strategy=where, runtime_env=actor_env(threads, modules)
                ).remote(config, dataset_root, threads)
            )
        if workers > 1:
            address = ray.get(
                _rendezvous.options(
                    scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
                ).remote()
            )
            ray.get([w.join_workers.remote(address, rank, workers) for rank, w in enumerate(self._cloud)])
        return [node_of[rank] for rank in range(workers)]

    @property
    def cloud(self) -> _RemoteCloud:
        return _RemoteCloud(self._cloud)

    def broadcast(self, round_index: int, participants: np.ndarray) -> Any:
        return self._cloud[0].broadcast.remote(round_index, participants)

    def run_devices(
        self, handle: Any, packs: list[int], deadline_s: float | None, on_pack_done: PackDone | None = None
    ) -> DevicePhase:
        phase = DevicePhase()
        self._replace_lost_packs()
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
                self._lost.add(index)
                continue
            if on_pack_done is not None:
                on_pack_done(index)
        phase.gather_s = time.perf_counter() - first if first is not None else 0.0
        return phase

    def _replace_lost_packs(self) -> None:
        """A new actor for each pack whose actor died last round, waited for until it has loaded its devices. It
        reserves the CPUs the old one had where the cluster still has them free, else none: after a node is lost
        the survivors may be full, and a pack waiting for a CPU that never frees up would lose its devices in every
        later round (it then shares a node's CPUs with the packs there). A new actor that dies at once (placed on a
        node that is gone but not yet known to be) is made again, for up to `REPLACE_WAIT_S`."""
        assert self._new_pack is not None, "start() first"
        deadline = time.perf_counter() + REPLACE_WAIT_S
        while self._lost and time.perf_counter() < deadline:
            calls = {}
            for index in sorted(self._lost):
                ray.kill(self._packs[index], no_restart=True)
                free = float(ray.available_resources().get("CPU", 0.0))
                self._packs[index] = self._new_pack(index, self._pack_cpus if free >= self._pack_cpus else 0.0)
                calls[self._packs[index].__ray_call__.remote(_constructed)] = index
            remaining = max(0.0, deadline - time.perf_counter())
            done, _ = ray.wait(list(calls), num_returns=len(calls), timeout=remaining)
            self._lost = set()
            for ref in done:
                try:
                    ray.get(ref)
                except RayActorError:
                    self._lost.add(calls[ref])
        self._lost.clear()  # still down after the wait: this round reports them failed again

    def _submit(self, index: int, handle: Any) -> Any:
        return self._packs[index].train_round.remote(handle)

    def kill_cloud_worker(self, rank: int) -> None:
        """Kill a cloud worker (fault injection); it is not restarted: the run stops with `CloudWorkerLost`."""
        ray.kill(self._cloud[rank], no_restart=True)

    def kill_pack(self, index: int) -> None:
        """Kill a pack's actor (fault injection); the runtime replaces it before the next round."""
        ray.kill(self._packs[index], no_restart=True)

    def shutdown(self) -> None:
        """End the run's actors and its placement group, then stop the Ray this runtime started (unless `keep_ray`:
        then wait, up to `RELEASE_WAIT_S`, until the CPUs they held are free again, so that the next run starts on
        a cluster as idle as this one found it, with none of these processes' memory still counted)."""
        ran = bool(self._cloud or self._packs)
        for actor in [*self._cloud, *self._packs]:
            ray.kill(actor)
        self._cloud, self._packs, self._lost, self._new_pack = [], [], set(), None
        if self._cloud_group is not None:
            remove_placement_group(self._cloud_group)
            self._cloud_group = None
        if not self._keep_ray:
            self.close()
            return
        deadline = time.perf_counter() + RELEASE_WAIT_S
        while ran and ray.available_resources().get("CPU", 0.0) < self._idle_cpus and time.perf_counter() < deadline:
            time.sleep(0.1)

    def close(self) -> None:
        """Stop the Ray this runtime started (a joined cluster keeps running)."""
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
