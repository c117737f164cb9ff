"""The round loop's orchestration with a fake runtime and a toy strategy: no Ray, no models, milliseconds.

The fake cloud and packs return scripted values; what is tested is the driver's own logic: who participates,
deadlines and stragglers (modelled and wall-clock), failed packs, a strategy's own columns, observers, resume."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from dccl_sim import metrics
from dccl_sim.algorithms.protocol import PackResult, result_columns
from dccl_sim.config import load_config
from dccl_sim.hosts.cloud import DeviceInfo, ModelCost
from dccl_sim.runtime.base import DevicePhase, Runtime
from dccl_sim.runtime.driver import Dataset, RunState, run_rounds
from dccl_sim.runtime.observers import Observer
from dccl_sim.strategies.base import Strategy

NUM_DEVICES = 12
KS = (5, 10, 20)  # metrics.ks's default
COST = ModelCost(1000, 100, 4, features=1e6, head=1e5, patch=1e4, first_hidden=1e4, input_dim=8, behaviour_dim=6)


class ToyStrategy(Strategy):
    """Trains every local sample once and records one column of its own."""

    name = "toy"
    device_columns = {"toy_seen": 0}  # noqa: RUF012 - a class-level constant, never mutated

    def device_step(self, device, ctx, broadcast, device_ids) -> PackResult:
        raise AssertionError("the fake runtime makes the packs' results itself")

    def cloud_step(self, cloud, ctx, results) -> dict[str, float]:
        raise AssertionError("the fake runtime makes the cloud's statistics itself")

    def flops_per_trained_sample(self, cost: ModelCost) -> float:
        return cost.head

    def planned_samples_trained(self, n_local: np.ndarray) -> np.ndarray:
        return n_local.copy()

    def round_columns(self, columns) -> dict[str, float]:
        return {"toy_total": float(columns["toy_seen"].sum())}


@dataclass
class FakeCloud:
    calls: list[tuple] = field(default_factory=list)
    loaded: dict | None = None

    def pretrain(self, cache_dir: str | None, on_progress=None) -> dict[str, float]:
        self.calls.append(("pretrain",))
        return {"pretrain_loss": 0.0, "pretrain_cached": 0.0}

    def load_state(self, state: dict) -> None:
        self.loaded = state

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(np.arange(NUM_DEVICES) % 2, 2)

    def model_cost(self) -> ModelCost:
        return COST

    def device_counts(self, round_index: int) -> dict[str, np.ndarray]:
        # device d holds d + 1 samples in round 0 and one more each round
        return {"n_local": np.arange(NUM_DEVICES) + 1 + round_index, "n_eval": np.full(NUM_DEVICES, 4)}

    def update(self, round_index: int, participants: np.ndarray, results: list[PackResult]) -> dict[str, float]:
        received = sorted(int(d) for r in results for d in r.device_ids)
        self.calls.append(("update", round_index, tuple(participants.tolist()), tuple(received)))
        return {"loss": float(round_index)}

    def evaluate(self) -> metrics.Evaluation:
        devices = np.repeat(np.arange(NUM_DEVICES), 2)
        labels = np.tile([1, 0], NUM_DEVICES)
        queries, scores = np.arange(2 * NUM_DEVICES) // 2, labels * 1.0
        return metrics.evaluate(devices, queries, labels, scores, devices % 2, 2, ks=KS)

    def state(self) -> dict:
        return {"rounds_done": len([c for c in self.calls if c[0] == "update"])}


class FakeRuntime(Runtime):
    """Packs answer with scripted results; `late` and `failed` name the packs that miss the deadline or die."""

    def __init__(self, late: set[int] = frozenset(), failed: set[int] = frozenset(), fail_round: int = -1) -> None:
        self._cloud = FakeCloud()
        self.late, self.failed, self.fail_round = late, failed, fail_round
        self.packs: list[np.ndarray] = []
        self.broadcasts: list[np.ndarray] = []

    def start(self, config, dataset_root: str, packs: list[np.ndarray]) -> None:
        self.packs = packs

    @property
    def cloud(self) -> FakeCloud:
        return self._cloud

    @property
    def num_cpus(self) -> int:
        return 3

    def broadcast(self, round_index: int, participants: np.ndarray) -> Any:
        self.broadcasts.append(participants)
        return (round_index, participants)

    def run_devices(self, handle: Any, packs: list[int], deadline_s: float | None, on_pack_done=None) -> DevicePhase:
        round_index, participants = handle
        if round_index == self.fail_round:
            raise RuntimeError("the cluster went away")
        phase = DevicePhase()
        for index in packs:
            if index in self.late:
                phase.late_packs.append(index)
            elif index in self.failed:
                phase.failed_packs.append(index)
            else:
                phase.results.append(_pack_result(self.packs[index][np.isin(self.packs[index], participants)]))
                on_pack_done(index)
        return phase


def _pack_result(ids: np.ndarray) -> PackResult:
    n = len(ids)
    columns = {name: np.zeros(n) for name in result_columns(metrics.ranking_names(KS))}
    columns |= {"device_id": ids, "n_test": np.full(n, 4), "n_queries": np.ones(n, dtype=np.int64)}
    columns |= {"start_auc": np.full(n, 0.5), "device_auc": np.full(n, 0.75), "samples_trained": ids + 1}
    columns |= {"gate_passed": np.ones(n, dtype=bool), "toy_seen": ids * 10}
    return PackResult(columns=columns)


class Recorder(Observer):
    def __init__(self) -> None:
        self.events: list[str] = []

    def on_start(self, config, num_devices, num_packs, first_round) -> None:
        self.events.append(f"start {num_devices} {num_packs} {first_round}")

    def on_round(self, record, state, cloud_state) -> None:
        self.events.append(f"round {record.round}")

    def on_end(self, state) -> None:
        self.events.append(f"end {len(state.records)}")


def _config(*overrides: str):
    return load_config(None, ["strategy=test_orchestration:ToyStrategy", "rounds=3", *overrides])


def _run(runtime: FakeRuntime, *overrides: str, state: RunState | None = None, observers=()) -> RunState:
    return run_rounds(_config(*overrides), runtime, Dataset("unused", NUM_DEVICES), observers, state)


def test_every_device_takes_part_and_the_strategy_records_its_columns() -> None:
    runtime, recorder = FakeRuntime(), Recorder()
    state = _run(runtime, observers=[recorder])
    assert recorder.events == ["start 12 3 0", "round 0", "round 1", "round 2", "end 3"]
    assert runtime.cloud.calls[0] == ("pretrain",)
    for t, record in enumerate(state.records):
        assert record.n_participants == NUM_DEVICES and record.n_stragglers == 0 and record.n_failed == 0
        assert record.toy_total == 10 * sum(range(NUM_DEVICES))
        assert record.cloud_loss == t  # the cloud step's statistics become cloud_<key> columns
        assert record.device_gauc == pytest.approx(0.75) and record.start_gauc == pytest.approx(0.5)
    frame = state.device_frames[0]
    assert np.array_equal(frame["toy_seen"], np.arange(NUM_DEVICES) * 10)
    # the toy trains (d + 1) samples at `head` FLOPs, 3× for the backward, plus features of local and eval samples
    ids = np.arange(NUM_DEVICES)
    assert np.allclose(frame["flops"], (ids + 1) * 3 * COST.head + (ids + 1 + 4) * COST.features)


def test_participants_are_a_seeded_sample_that_changes_by_round() -> None:
    runtime = FakeRuntime()
    _run(runtime, "runtime.participation=0.5", "seed=3")
    again = FakeRuntime()
    _run(again, "runtime.participation=0.5", "seed=3")
    sizes = {len(p) for p in runtime.broadcasts}
    assert sizes == {6}
    assert all(np.array_equal(a, b) for a, b in zip(runtime.broadcasts, again.broadcasts, strict=True))
    assert not np.array_equal(runtime.broadcasts[0], runtime.broadcasts[1])


def test_late_packs_are_stragglers_and_failed_packs_are_counted() -> None:
    runtime = FakeRuntime(late={0}, failed={2})
    state = _run(runtime, "rounds=1")
    record, frame = state.records[0], state.device_frames[0]
    late_ids, failed_ids = runtime.packs[0], runtime.packs[2]
    assert record.late_packs == 1 and record.n_failed == 1
    assert record.n_participants == len(runtime.packs[1])
    # every device without a result is a straggler row with NaN metrics and the strategy's default columns
    missing = np.isin(frame["device_id"], np.concatenate([late_ids, failed_ids]))
    assert frame["straggler"][missing].all() and not frame["straggler"][~missing].any()
    assert np.isnan(frame["device_auc"][missing]).all() and (frame["toy_seen"][missing] == 0).all()
    assert runtime.cloud.calls[1][3] == tuple(runtime.packs[1].tolist())  # the cloud learns only what came back


def test_the_device_phase_counts_the_devices_whose_results_are_back() -> None:
    """Packs report as they finish (no call per device): the phase line counts their participants, from zero up to
    the devices whose results came back; a pack that fails adds none."""

    class Phases(Observer):
        def __init__(self) -> None:
            self.seen: list[str] = []

        def on_phase(self, round_index: int, phase: str) -> None:
            self.seen.append(f"{round_index} {phase}")

    phases, runtime = Phases(), FakeRuntime(failed={1})
    _run(runtime, "rounds=1", "runtime.participation=0.5", observers=[phases])
    participants = runtime.broadcasts[0]
    taking_part = [int(np.isin(pack, participants).sum()) for pack in runtime.packs]
    assert len(taking_part) == 3 and min(taking_part) > 0  # the failed pack had devices to lose
    counted = [line for line in phases.seen if line.startswith("0 device step")]
    expected = [0, taking_part[0], taking_part[0] + taking_part[2]]
    assert counted == [f"0 device step: {done} of {len(participants)} devices done" for done in expected]
    assert phases.seen.index(counted[-1]) < phases.seen.index("0 cloud update")


def test_the_modelled_deadline_keeps_slow_devices_out_of_the_round() -> None:
    # device time grows with its samples; a deadline between the fastest and the slowest drops the slow ones
    runtime = FakeRuntime()
    state = _run(runtime, "rounds=1", "latency.compute_flops_sigma=0", "latency.bandwidth_sigma=0")
    times = state.device_frames[0]["sim_time_s"]
    cut = float(np.median(times))
    runtime = FakeRuntime()
    state = _run(
        runtime, "rounds=1", "latency.compute_flops_sigma=0", "latency.bandwidth_sigma=0", f"latency.deadline_s={cut}"
    )
    assert np.array_equal(runtime.broadcasts[0], np.flatnonzero(times <= cut))
    assert state.records[0].n_stragglers == int((times > cut).sum()) > 0


def test_a_failed_round_keeps_the_finished_ones_and_resume_continues_from_the_state() -> None:
    recorder = Recorder()
    with pytest.raises(RuntimeError, match="the cluster went away"):
        _run(FakeRuntime(fail_round=2), observers=[recorder])
    assert recorder.events[-1] == "end 2", "observers see the end with the rounds that finished"
    straight = _run(FakeRuntime())
    first = _run(FakeRuntime(), "rounds=1")
    resumed_runtime = FakeRuntime()
    state = RunState(records=first.records, device_frames=first.device_frames, cloud_state={"rounds_done": 1})
    resumed = _run(resumed_runtime, state=state)
    assert resumed_runtime.cloud.loaded == {"rounds_done": 1} and ("pretrain",) not in resumed_runtime.cloud.calls
    assert [r.round for r in resumed.records] == [0, 1, 2]
    for a, b in zip(straight.records, resumed.records, strict=True):
        assert (a.n_participants, a.device_gauc, a.sim_round_s) == (b.n_participants, b.device_gauc, b.sim_round_s)


def test_named_random_streams_derive_from_seed_round_and_ids() -> None:
    """A round's stream draws from (seed, round, ids, tag) alone; a plug-in's new stream needs a tag of its own."""
    from dccl_sim.context import RoundContext
    from dccl_sim.seeding import STREAMS, register_stream, seeded_generator

    ctx = RoundContext(_config("seed=4"), 2, np.arange(3))
    assert ctx.keys("patch_trial", 7) == (4, 2, 7, STREAMS["patch_trial"])
    assert ctx.rng("device_copy", 5).integers(1 << 30) == seeded_generator(4, 2, 5, 2).integers(1 << 30)
    with pytest.raises(ValueError, match="taken"):
        register_stream("my_plugin_draws", STREAMS["cloud_minibatches"])
    register_stream("test_orchestration_draws", 0x7E57)
    assert ctx.keys("test_orchestration_draws") == (4, 2, 0x7E57)
    with pytest.raises(KeyError, match="unknown random stream"):
        ctx.keys("no_such_stream")
