"""The round loop on both runtimes: placement invariance, resume, faults, deadlines, bad addresses."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY_RUN, assert_aucs_within_one_pair

from dccl_sim import metrics
from dccl_sim.config import SimConfig, load_config
from dccl_sim.data.prepare import prepare_dataset
from dccl_sim.runtime.driver import sample_participants
from dccl_sim.runtime.placement import chunk_bounds, plan_packs
from dccl_sim.runtime.ray_runtime import RayRuntime, RuntimeStartError
from dccl_sim.runtime.records import LATER_DEVICE_COLUMNS
from dccl_sim.runtime.session import resume_state, run

SMALL = [*TINY_RUN, "rounds=2"]
METRICS = ["start_gauc", "device_gauc", "cloud_gauc", "cloud_auc", "device_hr10", "cloud_ndcg10", "tail_cloud_gauc"]


def small_config(tmp_path: Path, *overrides: str) -> SimConfig:
    return load_config(None, [*SMALL, f"output.out_dir={tmp_path}", *overrides])


def _tables(out_dir: Path):
    rounds = pq.read_table(out_dir / "rounds.parquet").to_pydict()
    devices = pq.read_table(out_dir / "devices.parquet").to_pydict()
    return rounds, devices


def _flat_arrays(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    arrays = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            arrays |= _flat_arrays(value, f"{prefix}{key}.")
        else:
            arrays[prefix + key] = np.asarray(value)
    return arrays


def assert_same_results(a: Path, b: Path) -> None:
    """Same cloud model, patch generator and starting meta-patches (1e-5) and the same per-device records.

    Placement changes the shapes of batched float32 products, so scores agree to ~1e-7, not bit for bit; a
    per-device AUC is a count of ordered pairs, so two scores tied to within that may swap: each device's AUC may
    differ by one positive/negative pair, 1 / (positives × negatives), and by nothing more."""
    checkpoints_a, checkpoints_b = (sorted((run / "checkpoints").iterdir()) for run in (a, b))
    assert [p.name for p in checkpoints_a] == [p.name for p in checkpoints_b]
    for path_a, path_b in zip(checkpoints_a, checkpoints_b, strict=True):
        state_a, state_b = (_flat_arrays(torch.load(p, weights_only=False)["cloud"]) for p in (path_a, path_b))
        assert state_a.keys() == state_b.keys()
        for name, value in state_a.items():
            np.testing.assert_allclose(value, state_b[name], atol=1e-5, err_msg=f"{path_a.name}: {name}")
    rounds_a, devices_a = _tables(a)
    rounds_b, devices_b = _tables(b)
    for name in METRICS:
        np.testing.assert_allclose(rounds_a[name], rounds_b[name], atol=1e-5, err_msg=name)
    for name in ("device_id", "n_train", "n_test", "straggler", "gate_passed"):
        assert devices_a[name] == devices_b[name], name
    np.testing.assert_allclose(devices_a["sim_time_s"], devices_b["sim_time_s"], atol=1e-5)
    eval_negatives = json.loads((a / "config.json").read_text())["data"]["eval_negatives"]
    for name in ("start_auc", "device_auc", "cloud_auc"):
        assert_aucs_within_one_pair(devices_b[name], devices_a[name], devices_a["n_test"], eval_negatives, name)


def test_participants_are_seeded_and_sorted() -> None:
    a = sample_participants(seed=1, round_index=2, num_devices=100, fraction=0.3)
    assert len(a) == 30 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, sample_participants(1, 2, 100, 0.3))
    assert not np.array_equal(a, sample_participants(1, 3, 100, 0.3))
    assert len(sample_participants(0, 0, 5, 0.01)) == 1


def test_packs_are_contiguous_ranges() -> None:
    config = load_config(None, ["runtime.devices_per_actor=3"]).runtime
    assert [p.tolist() for p in plan_packs(7, config, cpus=2)] == [[0, 1, 2], [3, 4], [5, 6]]
    auto = load_config().runtime
    assert len(plan_packs(943, auto, cpus=2)) == 2
    assert len(plan_packs(1, auto, cpus=8)) == 1


def test_packs_balance_the_work_they_are_given() -> None:
    auto = load_config(None, ["runtime.num_actors=2"]).runtime
    # one heavy device first: equal sizes would give the first pack 103 of 106 units of work
    work = np.array([100, 1, 1, 1, 1, 1, 1])
    assert [p.tolist() for p in plan_packs(7, auto, cpus=2, work=work)] == [[0], [1, 2, 3, 4, 5, 6]]
    rng = np.random.default_rng(0)
    work = rng.pareto(1.5, size=943) * 100 + 10
    packs = plan_packs(943, load_config().runtime, cpus=3, work=work)
    assert np.array_equal(np.concatenate(packs), np.arange(943))
    shares = [work[p].sum() / work.sum() for p in packs]
    equal_sizes = [work[p].sum() / work.sum() for p in np.array_split(np.arange(943), 3)]
    assert max(shares) - min(shares) < max(equal_sizes) - min(equal_sizes)
    assert max(abs(share - 1 / 3) for share in shares) < work.max() / work.sum()
    # every pack keeps at least one device, whatever the work
    assert [len(p) for p in plan_packs(3, load_config().runtime, cpus=3, work=np.array([0, 0, 1e9]))] == [1, 1, 1]
    # an explicit devices_per_actor keeps its sizes
    sized = load_config(None, ["runtime.devices_per_actor=3"]).runtime
    assert [len(p) for p in plan_packs(7, sized, cpus=2, work=work[:7])] == [3, 2, 2]


def test_chunks_hold_at_most_chunk_devices_and_chunk_samples_past_their_first_device() -> None:
    counts = np.array([3, 3, 3, 10, 1, 1, 1, 1, 1])
    by_samples = load_config(None, ["runtime.chunk_samples=6"]).runtime
    # a device with more samples than the bound gets a chunk of its own, not an empty one before it
    assert chunk_bounds(counts, by_samples) == [(0, 2), (2, 3), (3, 4), (4, 9)]
    both = load_config(None, ["runtime.chunk_samples=6", "runtime.chunk_devices=3"]).runtime
    assert chunk_bounds(counts, both) == [(0, 2), (2, 3), (3, 4), (4, 7), (7, 9)]
    assert chunk_bounds(np.zeros(0, dtype=np.int64), both) == []


def test_local_run_writes_the_run_directory(tmp_path: Path) -> None:
    config = small_config(tmp_path / "run", "runtime.backend=local")
    state = run(config)
    assert len(state.records) == 2
    rounds, devices = _tables(tmp_path / "run")
    assert rounds["round"] == [0, 1] and rounds["n_participants"] == [8, 8]
    assert sorted(set(devices["device_id"])) == list(range(8))
    assert (tmp_path / "run" / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["round-0000.pt", "round-0001.pt"]
    assert all(np.isfinite(rounds["cloud_gauc"])) and all(0.0 < v < 1.0 for v in rounds["cloud_gauc"])
    assert all(100 < mb < 100_000 for mb in rounds["peak_memory_mb"])


def test_eval_devices_evaluates_the_same_seeded_sample_every_round(tmp_path: Path) -> None:
    config = small_config(tmp_path / "run", "runtime.backend=local", "strategy=dccl", "metrics.eval_devices=3")
    run(config)
    rounds, devices = _tables(tmp_path / "run")
    chosen = metrics.evaluated_devices(config.seed, 8, 3)
    assert len(chosen) == 3 and not np.array_equal(chosen, metrics.evaluated_devices(config.seed + 1, 8, 3))
    ids, n_test = np.array(devices["device_id"]), np.array(devices["n_test"])
    for r in (0, 1):
        in_round = np.array(devices["round"]) == r
        assert np.array_equal(np.sort(ids[in_round & (n_test > 0)]), chosen)
        for name in ("start_auc", "device_auc", "cloud_auc"):
            values = np.array(devices[name], dtype=float)[in_round]
            assert np.isnan(values[~np.isin(ids[in_round], chosen)]).all(), name
    # every device still trains: evaluation is sampled, participation is not
    assert (np.array(devices["n_train"]) > 0).sum() > 3
    assert all(np.isfinite(rounds["cloud_gauc"])) and all(np.isfinite(rounds["device_gauc"]))


def test_placement_does_not_change_results(tmp_path: Path, ray_session) -> None:
    local = small_config(tmp_path / "local", "runtime.backend=local")
    run(local)
    packed = small_config(tmp_path / "packed", "runtime.num_actors=2")
    run(packed, runtime=RayRuntime())
    one_per_device = small_config(tmp_path / "single", "runtime.devices_per_actor=1")
    run(one_per_device, runtime=RayRuntime())
    assert_same_results(tmp_path / "local", tmp_path / "packed")
    assert_same_results(tmp_path / "local", tmp_path / "single")


@pytest.mark.parametrize(
    ("strategy", "chunking"),
    [("dccl", "runtime.chunk_devices=3"), ("fedavg", "runtime.chunk_devices=3"), ("dccl", "runtime.chunk_samples=1")],
)
def test_training_a_pack_in_chunks_of_devices_does_not_change_results(
    tmp_path: Path, strategy: str, chunking: str
) -> None:
    whole = small_config(
        tmp_path / "whole", "runtime.backend=local", f"strategy={strategy}", f"runtime.chunk_samples={2**40}"
    )
    run(whole)
    chunked = small_config(tmp_path / "chunked", "runtime.backend=local", f"strategy={strategy}", chunking)
    run(chunked)
    assert_same_results(tmp_path / "whole", tmp_path / "chunked")


def test_resume_and_extend_equal_an_uninterrupted_run(tmp_path: Path) -> None:
    common = ["runtime.backend=local", "rounds=3", "data.windows=3"]
    run(small_config(tmp_path / "straight", *common))
    run(small_config(tmp_path / "stopped", *common[:1], "rounds=2", "data.windows=3"))
    config, state = resume_state(tmp_path / "stopped", ["rounds=3"])
    assert state.next_round == 2
    run(config, state)
    assert_same_results(tmp_path / "straight", tmp_path / "stopped")


def test_an_older_run_resumes(tmp_path: Path) -> None:
    """A run written before `flops` existed, and with CoDA's columns (every strategy wrote them, as 0, before
    strategies owned their columns), resumes: the missing column is filled, the foreign ones are dropped."""
    out = tmp_path / "old"
    run(small_config(out, "runtime.backend=local", "rounds=1"))
    table = pq.read_table(out / "devices.parquet").drop_columns(list(LATER_DEVICE_COLUMNS))
    table = table.append_column("n_kept", pa.array(np.zeros(table.num_rows, dtype=np.int64)))
    pq.write_table(table, out / "devices.parquet")
    config, state = resume_state(out, ["rounds=2"])
    assert np.isnan(state.device_frames[0]["flops"]).all() and "n_kept" not in state.device_frames[0]
    run(config, state)
    assert pq.read_table(out / "rounds.parquet").num_rows == 2
    assert "n_kept" not in pq.read_table(out / "devices.parquet").column_names


class KillingRuntime(RayRuntime):
    """Kills pack 0's actor right after the first round's task is submitted to it: a real fault, mid-round."""

    killed = False

    def _submit(self, index, handle):
        ref = super()._submit(index, handle)
        if index == 0 and not self.killed:
            self.killed = True
            self.kill_pack(0)
        return ref


def test_a_killed_device_actor_is_restarted_and_the_run_finishes(tmp_path: Path, ray_session) -> None:
    config = small_config(tmp_path / "faulty", "runtime.num_actors=2")
    state = run(config, runtime=KillingRuntime())
    first, second = state.records
    # pack 0's devices (packs balance the devices' work, so not necessarily half of them) are lost in round 0
    lost = first.failed_devices
    assert first.n_failed == 1 and 0 < lost < 8 and first.n_participants == 8 - lost and first.n_stragglers == lost
    assert f"1 packs lost ({lost} devices)" in first.summary()
    assert second.n_failed == 0 and second.n_participants == 8 and second.failed_devices == 0
    assert first.t_setup_s > 0 and math.isnan(second.t_setup_s)  # the run's set-up, on its first round only


def test_wall_clock_deadline_drops_late_packs(tmp_path: Path) -> None:
    config = small_config(tmp_path / "late", "runtime.backend=local", "runtime.deadline_s=0.000001")
    state = run(config)
    assert all(r.n_participants == 0 and r.n_stragglers == 8 for r in state.records)
    # loud, not silent: the records, the progress line and the report say the rounds had no device results
    assert all(r.no_device_results and r.late_packs >= 1 for r in state.records)
    assert "NO DEVICE RESULTS" in state.records[0].summary() and "per pack" in state.records[0].summary()
    from dccl_sim.report import write_report

    assert "Rounds without any device result: 0, 1." in write_report(tmp_path / "late").read_text()


def test_a_round_with_results_is_not_flagged(tmp_path: Path) -> None:
    state = run(small_config(tmp_path / "ok", "runtime.backend=local", "rounds=1"))
    assert not state.records[0].no_device_results and "NO DEVICE" not in state.records[0].summary()


def test_modelled_deadline_makes_slow_devices_stragglers(tmp_path: Path) -> None:
    base = small_config(tmp_path / "all", "runtime.backend=local")
    times = np.array(pq.read_table(_run_dir(base) / "devices.parquet")["sim_time_s"].to_pylist())
    cut = float(np.median(times[:8]))
    config = small_config(tmp_path / "cut", "runtime.backend=local", f"latency.deadline_s={cut}")
    state = run(config)
    assert 0 < state.records[0].n_stragglers < 8
    assert state.records[0].n_participants + state.records[0].n_stragglers == 8


def _run_dir(config: SimConfig) -> Path:
    run(config)
    return Path(config.output.out_dir)


def test_unreachable_address_fails_fast() -> None:
    start = time.perf_counter()
    with pytest.raises(RuntimeStartError, match=r"cannot reach a Ray cluster at 127\.0\.0\.1:1"):
        _ = RayRuntime(address="127.0.0.1:1").num_cpus
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("torch_threads", [None, 1])
def test_every_actor_starts_openmp_with_the_threads_its_torch_uses(
    tmp_path: Path, ray_session, torch_threads: int | None
) -> None:
    # Ray starts an actor below one CPU with OMP_NUM_THREADS=1, and libgomp started so runs several threads slower
    def openmp_and_torch_threads(_role) -> tuple[str | None, int]:  # nested: Ray ships it by value
        return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()

    threads = [] if torch_threads is None else [f"runtime.torch_threads={torch_threads}"]
    config = small_config(tmp_path, "runtime.num_actors=2", *threads)
    runtime = RayRuntime()
    runtime.start(config, str(prepare_dataset(config.data, config.seed)), plan_packs(8, config.runtime, cpus=2))
    try:
        actors = [*runtime._cloud, *runtime._packs]
        found = ray_session.get([actor.__ray_call__.remote(openmp_and_torch_threads) for actor in actors])
    finally:
        runtime.shutdown()
    cloud, *packs = found
    assert cloud == (str(torch_threads or 2), torch_threads or 2)  # the session's Ray has 2 CPUs
    assert packs == [(str(torch_threads or 1), torch_threads or 1)] * 2


@pytest.mark.parametrize("strategy", ["dccl", "metapatch"])
def test_the_broadcast_baseline_is_the_model_the_cloud_left(tmp_path: Path, strategy: str) -> None:
    """`broadcast_*` is the plain broadcast model W_t (θ̂ = 0, no starting patch): with every device taking part
    and evaluated, round t's equals round t − 1's cloud model on the same samples, per device and pooled. MetaPatch
    starts from θ̂ = 0, so its start is the broadcast model; dccl's starting patch θ̃ makes its start another model
    once the patch-space update has run."""
    run(small_config(tmp_path, "runtime.backend=local", "rounds=3", f"strategy={strategy}"))
    rounds, devices = _tables(tmp_path)
    for t in (1, 2):
        assert rounds["broadcast_gauc"][t] == pytest.approx(rounds["cloud_gauc"][t - 1], abs=1e-12)
        assert rounds["broadcast_hr@10"][t] == pytest.approx(rounds["cloud_hr@10"][t - 1], abs=1e-12)
        assert rounds["broadcast_mrr"][t] == pytest.approx(rounds["cloud_mrr"][t - 1], abs=1e-12)
        assert rounds["tail_broadcast_gauc"][t] == pytest.approx(rounds["tail_cloud_gauc"][t - 1], abs=1e-12)
    device_round = np.array(devices["round"])
    for t in (1, 2):
        now, before = device_round == t, device_round == t - 1
        assert np.array_equal(np.array(devices["device_id"])[now], np.array(devices["device_id"])[before])
        np.testing.assert_array_equal(
            np.array(devices["broadcast_auc"])[now], np.array(devices["cloud_auc"])[before], err_msg=f"round {t}"
        )
    starts, broadcasts = np.array(rounds["start_gauc"]), np.array(rounds["broadcast_gauc"])
    assert starts[0] == pytest.approx(broadcasts[0], abs=1e-9)  # θ̃ = 0 before any patch-space update
    if strategy == "metapatch":
        np.testing.assert_allclose(starts, broadcasts, atol=1e-9)
    else:
        assert not np.allclose(starts[1:], broadcasts[1:], atol=1e-6)
