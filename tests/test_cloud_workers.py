"""The cloud trains data-parallel over `cloud.workers` processes and learns what one worker learns: the same seeded
minibatches, each split over the workers, gradients summed (docs/scale-out.md)."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_runtime import _flat_arrays, assert_same_results, small_config

from dccl_sim.algorithms.data_parallel import MinibatchLoss, minibatch_loop, part_of
from dccl_sim.config import ConfigError, load_config
from dccl_sim.runtime.ray_runtime import CloudWorkerLost, RayRuntime, _RemoteCloud
from dccl_sim.runtime.session import resume_state, run


@pytest.mark.parametrize("n", [0, 1, 2, 7, 10])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_parts_cover_a_minibatch_once_in_order(n: int, workers: int) -> None:
    parts = [part_of(n, rank, workers) for rank in range(workers)]
    covered = np.concatenate([np.arange(n)[p] for p in parts])
    assert covered.tolist() == list(range(n))
    assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def _train(rank: int, workers: int, port: int, out: str) -> None:
    """A small model trained by `minibatch_loop` as worker `rank` of `workers`: 10 samples in minibatches of 4, so
    the last minibatch (2 samples) leaves a third worker's part empty; a penalty reported apart; a leaf tensor."""
    if workers > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=workers)
    torch.manual_seed(0)
    x, y = torch.randn(10, 5), torch.randint(0, 2, (10,)).float()
    model = torch.nn.Linear(5, 1)
    unused = torch.nn.Parameter(torch.ones(3))  # no gradient anywhere: Adam must leave it alone
    table = torch.zeros(10, 2)  # a lazily stepped table: its touched rows are leaves
    optimizer = torch.optim.Adam([*model.parameters(), unused], lr=0.1)

    def part_loss(positions: np.ndarray, part: slice) -> MinibatchLoss:
        rows = torch.from_numpy(positions)
        active = table[rows].requires_grad_(True)
        mine = rows[part]
        logits = model(x[mine]).squeeze(1) + active[part].sum(dim=1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[mine])
        return MinibatchLoss(loss + 0.01 * model.weight.pow(2).sum(), loss, (active,))

    def step_table(step: MinibatchLoss) -> None:
        rows = torch.from_numpy(order_seen[-1])
        table[rows] -= 0.5 * step.leaves[0].grad

    order_seen: list[np.ndarray] = []

    def recording(positions: np.ndarray, part: slice) -> MinibatchLoss:
        order_seen.append(positions.copy())
        return part_loss(positions, part)

    losses = minibatch_loop(
        10,
        recording,
        [*model.parameters(), unused],
        optimizer,
        epochs=3,
        batch_size=4,
        rng=np.random.default_rng(5),
        after_step=step_table,
    )
    if rank == 0:
        torch.save({"model": model.state_dict(), "unused": unused.detach(), "table": table, "losses": losses}, out)
    if workers > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_loop_on_two_and_three_processes_learns_what_one_does(tmp_path: Path) -> None:
    results = {}
    for workers in (1, 2, 3):
        out = str(tmp_path / f"w{workers}.pt")
        if workers == 1:
            _train(0, 1, 0, out)
        else:
            mp.spawn(_train, args=(workers, _free_port(), out), nprocs=workers, join=True)
        results[workers] = torch.load(out)
    one = results[1]
    assert torch.equal(one["unused"], torch.ones(3))
    for workers in (2, 3):
        other = results[workers]
        for name, value in one["model"].items():
            torch.testing.assert_close(other["model"][name], value, atol=1e-6, rtol=0)
        torch.testing.assert_close(other["table"], one["table"], atol=1e-6, rtol=0)
        assert torch.equal(other["unused"], torch.ones(3))
        np.testing.assert_allclose(other["losses"], one["losses"], atol=1e-6)
    assert one["table"].abs().sum() > 0 and one["losses"][-1] < one["losses"][0]


def _states(out: Path) -> dict[str, np.ndarray]:
    """Every checkpoint's cloud model, patch generator, encoder and starting meta-patches, flattened."""
    arrays = {}
    for path in sorted((out / "checkpoints").iterdir()):
        state = torch.load(path, weights_only=False)["cloud"]  # the cloud host's whole state
        for part in ("cloud", "patch", "encoder"):
            arrays |= {f"{path.name}:{part}.{k}": v for k, v in _flat_arrays(state[part]).items()}
        arrays[f"{path.name}:start_theta"] = np.asarray(state["start_theta"])
    return arrays


def test_two_and_three_cloud_workers_learn_what_one_does(tmp_path: Path, ray_session) -> None:
    """dccl (pretraining, bootstrapping G, MoMoDistill, the patch-space update) on Ray with 1, 2 and 3 cloud
    workers: the same models after every round and the same records, within 1e-5."""
    runs = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"workers{workers}"
        config = small_config(
            out,
            f"cloud.workers={workers}",
            "runtime.torch_threads=1",
            "runtime.num_actors=1",
            "cloud.pretrain_epochs=2",
            "patch.bootstrap_epochs=2",
            f"data.cache_dir={tmp_path / 'cache'}",  # nothing pretrained by another test
        )
        run(config)
        runs[workers] = out
        assert pq.read_table(out / "rounds.parquet")["cloud_workers"].to_pylist() == [workers] * 2  # really split
    one = _states(runs[1])
    for workers in (2, 3):
        other = _states(runs[workers])
        assert other.keys() == one.keys()
        for name, value in one.items():
            np.testing.assert_allclose(other[name], value, atol=1e-5, err_msg=f"{workers} workers: {name}")
        assert_same_results(runs[1], runs[workers])
    pretrained = sorted(p.name for p in (tmp_path / "cache" / "pretrained").iterdir())
    assert len(pretrained) == 3  # a cache entry per worker count: their float sums differ


def test_cloud_workers_need_the_ray_backend() -> None:
    with pytest.raises(ConfigError, match=r"cloud\.workers = 2 needs runtime\.backend = ray"):
        load_config(None, ["cloud.workers=2", "runtime.backend=local"])


class CloudKillingRuntime(RayRuntime):
    """Kills cloud worker 1 as round 1's cloud update begins: a real death (`ray.kill`, no restart)."""

    @property
    def cloud(self) -> _RemoteCloud:
        runtime = self

        class Killing(_RemoteCloud):
            def update(self, round_index, participants, results):
                if round_index == 1:
                    runtime.kill_cloud_worker(1)
                return super().update(round_index, participants, results)

        return Killing(self._cloud)


def test_a_dead_cloud_worker_stops_the_run_clearly_and_resume_continues(tmp_path: Path, ray_session) -> None:
    out = tmp_path / "run"
    settings = ["cloud.workers=2", "runtime.torch_threads=1", "runtime.num_actors=1", "rounds=3"]
    with pytest.raises(CloudWorkerLost, match=r"cloud worker 1 of 2 died during update.*--resume"):
        run(small_config(out, *settings), runtime=CloudKillingRuntime())
    assert pq.read_table(out / "rounds.parquet")["round"].to_pylist() == [0]  # interrupted in round 1, 0 kept
    config, state = resume_state(out, [])
    resumed = run(config, state)
    assert [r.round for r in resumed.records] == [0, 1, 2]
    assert pq.read_table(out / "rounds.parquet")["cloud_workers"].to_pylist() == [2, 2, 2]
