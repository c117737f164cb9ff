"""MetaPatch, the packed device step, PackedAdam, MoMoDistill and strategy determinism (docs/design.md §3–§4)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import round_context

from dccl_sim.algorithms import cloud_steps, metapatch_step
from dccl_sim.algorithms.cloud_steps import (
    binary_kl_with_temperature,
    distill_weight,
    finetune,
    momodistill_step,
    teacher_weights,
)
from dccl_sim.algorithms.metapatch_step import (
    GROUPED_MIN_ROWS,
    SEGMENT_MIN_ROWS,
    LocalSamples,
    metapatch_device_step,
    patched_logits,
    train_patches,
)
from dccl_sim.algorithms.packed_adam import PackedAdam
from dccl_sim.config import CloudConfig, DeviceConfig, ModelConfig, PatchConfig, load_config
from dccl_sim.data.device_data import SPLIT_TRAIN
from dccl_sim.hosts.device import group_by_device, newest_slice_starts
from dccl_sim.models.base import ModelSpec
from dccl_sim.models.din import DIN
from dccl_sim.models.metapatch import MetaPatch, row_tiles
from dccl_sim.runtime.session import run

K_PATCH, RANK = 16, 4


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Exact comparisons need one thread: with several, CPU embedding backward sums in a varying order (1e-8)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _models(seed: int = 0) -> tuple[DIN, MetaPatch]:
    torch.manual_seed(seed)
    model = DIN(ModelSpec(30, 3, (2, 4), np.arange(31) % 3), ModelConfig())
    patch = MetaPatch(model.hidden_sizes, K_PATCH, RANK)
    for module in (model, patch):
        module.requires_grad_(False)
        module.eval()
    return model, patch


def _samples(sizes: list[int], model: DIN, gate_frac: float = 0.3, seed: int = 0) -> LocalSamples:
    """Synthetic z_0 rows for devices of the given sizes, with labels that depend on the device (so patches learn)."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    z0 = torch.relu(torch.randn(total, model.hidden_sizes[0], generator=generator))
    device = np.repeat(np.arange(len(sizes)), sizes)
    bias = torch.from_numpy(np.where(device % 2 == 0, 1.0, -1.0)).float()
    label = (torch.rand(total, generator=generator) < torch.sigmoid(bias * z0[:, :5].sum(1) / 5)).float()
    ends = np.cumsum(sizes).astype(np.int64)
    starts = ends - np.asarray(sizes, dtype=np.int64)
    holdout = starts + np.floor((1 - gate_frac) * np.asarray(sizes)).astype(np.int64)
    return LocalSamples(
        z0=z0,
        label=label,
        starts=starts,
        ends=ends,
        holdout_start=holdout,
        device_ids=np.arange(100, 100 + len(sizes), dtype=np.int64),
    )


# ---------------------------------------------------------------- MetaPatch invariants


def test_zero_meta_patch_is_the_cloud_model_exactly() -> None:
    model, patch = _models()
    z0 = torch.relu(torch.randn(64, model.hidden_sizes[0]))
    plain = model.head_from_first(z0)
    patched = model.head_from_first(z0, patch.patch(torch.zeros(64, K_PATCH)))
    assert torch.equal(plain, patched)
    assert all(torch.equal(b, torch.zeros_like(b)) for b in patch.up_matrices(torch.zeros(K_PATCH)))
    theta = torch.randn(64, K_PATCH)
    assert not torch.equal(plain, model.head_from_first(z0, patch.patch(theta)))


def test_gradient_reaches_the_meta_patch_at_zero() -> None:
    model, patch = _models()
    z0 = torch.relu(torch.randn(64, model.hidden_sizes[0]))
    theta = torch.zeros(64, K_PATCH, requires_grad=True)
    label = (torch.arange(64) % 2).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model.head_from_first(z0, patch.patch(theta)), label)
    loss.backward()
    assert theta.grad is not None and theta.grad.abs().sum() > 0
    assert (theta.grad.abs().sum(dim=1) > 0).all()


@pytest.mark.parametrize("tile", [32, 8])
def test_grouped_patch_equals_the_per_sample_patch_with_its_gradients(tile: int) -> None:
    """One patch matrix per device applied over tiles of its rows is the same function as (u ⊗ θ) Θᵀ per row:
    values, gradients w.r.t. θ and G, for devices of 1 to 70 rows in any row order; θ = 0 stays exact."""
    model, patch = _models()
    patch.requires_grad_(True)
    generator = torch.Generator().manual_seed(3)
    sizes = [1, 70, 5, 33, 2]
    group = np.random.default_rng(0).permutation(np.repeat(np.arange(len(sizes)), sizes))
    tiles = row_tiles(group, tile)
    z0 = torch.relu(torch.randn(len(group), model.hidden_sizes[0], generator=generator))
    theta = torch.randn(len(sizes), K_PATCH, generator=generator, requires_grad=True)
    rows = torch.from_numpy(group)
    results = []
    for make in (lambda: patch.patch(theta[rows]), lambda: patch.grouped_patch(theta, tiles)):
        theta.grad = None
        patch.zero_grad()
        out = model.head_from_first(z0, make())
        out.square().sum().backward()
        results.append((out.detach(), theta.grad.clone(), [p.grad.clone() for p in patch.parameters()]))
    (per_row, theta_grad, patch_grads), (grouped, grouped_theta_grad, grouped_patch_grads) = results
    torch.testing.assert_close(grouped, per_row, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped_theta_grad, theta_grad, atol=1e-4, rtol=1e-4)
    for a, b in zip(grouped_patch_grads, patch_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert tiles.num_tiles == sum(-(-n // tiles.tile) for n in sizes)
    zero = model.head_from_first(z0, patch.grouped_patch(torch.zeros(len(sizes), K_PATCH), tiles))
    assert torch.equal(zero, model.head_from_first(z0))


def test_patched_logits_mixes_row_by_row_and_grouped_devices_as_one_function() -> None:
    """Devices below GROUPED_MIN_ROWS rows take the row-by-row patch, the others the grouped one: in any row order
    the logits and θ gradients equal the row-by-row patch of every row, and a device's logits do not depend on
    which devices share the call."""
    model, patch = _models()
    generator = torch.Generator().manual_seed(5)
    sizes = [1, GROUPED_MIN_ROWS - 1, GROUPED_MIN_ROWS, 40, 3]
    device = torch.from_numpy(np.random.default_rng(1).permutation(np.repeat(np.arange(len(sizes)), sizes)))
    z0 = torch.relu(torch.randn(len(device), model.hidden_sizes[0], generator=generator))
    theta = torch.randn(len(sizes), K_PATCH, generator=generator, requires_grad=True)
    mixed = patched_logits(model, patch, z0, theta, device)
    (mixed_grad,) = torch.autograd.grad(mixed.square().sum(), theta)
    per_row = model.head_from_first(z0, patch.patch(theta[device]))
    (per_row_grad,) = torch.autograd.grad(per_row.square().sum(), theta)
    torch.testing.assert_close(mixed, per_row, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed_grad, per_row_grad, atol=1e-4, rtol=1e-4)
    for m in (1, 3):  # one device below the threshold, one above, each alone
        rows = torch.nonzero(device == m).squeeze(1)
        alone = patched_logits(model, patch, z0[rows], theta, device[rows])
        torch.testing.assert_close(alone, mixed[rows], atol=1e-6, rtol=1e-6)


def test_rows_laid_out_device_by_device_take_the_segment_patch_with_the_same_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows that come device by device, SEGMENT_MIN_ROWS or more per device on average (an evaluation split), are
    patched a device at a time: bit for bit the logits the tiles give (also where a device below GROUPED_MIN_ROWS,
    patched row by row, sits among them), and the row-by-row patch's within float rounding; shuffled rows take
    the tiles."""
    model, patch = _models()
    generator = torch.Generator().manual_seed(7)
    device = torch.from_numpy(np.repeat(np.arange(5), [200, 3, 97, SEGMENT_MIN_ROWS, 150]))
    z0 = torch.relu(torch.randn(len(device), model.hidden_sizes[0], generator=generator))
    theta = torch.randn(5, K_PATCH, generator=generator)
    order = torch.from_numpy(np.random.default_rng(2).permutation(len(device)))
    calls = []
    segment_patch = patch.segment_patch
    patch.segment_patch = lambda *args: calls.append(args) or segment_patch(*args)
    with torch.no_grad():
        laid_out = patched_logits(model, patch, z0, theta, device)
        shuffled = patched_logits(model, patch, z0[order], theta, device[order])
        assert len(calls) == 1  # the shuffled rows took the tiles
        monkeypatch.setattr(metapatch_step, "SEGMENT_MIN_ROWS", len(device) + 1)
        assert torch.equal(laid_out, patched_logits(model, patch, z0, theta, device))  # the tiles' values
        assert len(calls) == 1
        per_row = model.head_from_first(z0, patch.patch(theta[device]))
    torch.testing.assert_close(laid_out, per_row, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shuffled, laid_out[order], atol=1e-6, rtol=1e-6)


def test_whole_device_chunks_cover_the_samples_without_splitting_a_device() -> None:
    rows = np.repeat(np.arange(6), [5, 1, 9, 2, 2, 4])
    chunks = cloud_steps.whole_device_chunks(rows, 6)
    assert chunks == [(0, 6), (6, 15), (15, 23)]  # each the fewest whole devices of at least 6 samples
    assert cloud_steps.whole_device_chunks(rows, 100) == [(0, 23)]
    assert cloud_steps.whole_device_chunks(np.zeros(0, dtype=np.int64), 4) == []


def test_device_step_changes_only_the_meta_patches() -> None:
    model, patch = _models()
    before = copy.deepcopy((model.state_dict(), patch.state_dict()))
    samples = _samples([40, 120, 7], model)
    config = DeviceConfig(gate=False, local_epochs=2)
    result = metapatch_device_step(
        model, patch, samples, torch.zeros(3, K_PATCH), config, round_context(seed=0, round_index=0)
    )
    for module, state in zip((model, patch), before, strict=True):
        for name, value in module.state_dict().items():
            assert torch.equal(value, state[name]), name
    assert result.theta.shape == (3, K_PATCH) and (result.theta.abs().sum(dim=1) > 0).all()


# ---------------------------------------------------------------- packed == per-device


@pytest.mark.parametrize("gate", [False, True])
def test_packed_step_equals_single_device_steps(gate: bool) -> None:
    model, patch = _models()
    sizes = [1, 2, 5, 33, 150, 3000, 64]
    samples = _samples(sizes, model)
    config = DeviceConfig(gate=gate, local_epochs=2, batch_size=32)
    start = 0.05 * torch.randn(len(sizes), K_PATCH, generator=torch.Generator().manual_seed(3))
    packed = metapatch_device_step(model, patch, samples, start, config, round_context(seed=7, round_index=2))
    for m in range(len(sizes)):
        single = metapatch_device_step(
            model, patch, samples.alone(m), start[m : m + 1], config, round_context(seed=7, round_index=2)
        )
        torch.testing.assert_close(packed.theta[m : m + 1], single.theta, atol=1e-5, rtol=0)
        assert packed.gate_passed[m] == single.gate_passed[0]
        assert packed.steps[m] == single.steps[0]
    assert packed.gate_passed.any() and packed.theta.abs().sum() > 0
    if gate:  # a device with a single sample has no older data to try a patch on: it keeps the cloud model
        assert not packed.gate_passed[0] and torch.equal(packed.theta[0], torch.zeros(K_PATCH))


def test_train_patches_ignores_the_other_devices() -> None:
    """A device's patch does not depend on which other devices share its pack."""
    model, patch = _models()
    samples = _samples([20, 500, 3], model)
    config = DeviceConfig(local_epochs=3, batch_size=16)
    keys = [(0, 0, int(d), 0) for d in samples.device_ids]
    theta, steps = train_patches(
        model, patch, samples, samples.starts, samples.ends, torch.zeros(3, K_PATCH), config, keys
    )
    alone, alone_steps = train_patches(
        model, patch, samples.alone(2), np.array([0]), np.array([3]), torch.zeros(1, K_PATCH), config, keys[2:]
    )
    torch.testing.assert_close(theta[2:], alone, atol=1e-5, rtol=0)
    assert steps.tolist() == [6, 96, 3] and alone_steps.tolist() == [3]


def test_packed_adam_equals_torch_adam_row_by_row() -> None:
    generator = torch.Generator().manual_seed(0)
    rows, width, lr = 5, 7, 3e-2
    packed_param = torch.randn(rows, width, generator=generator)
    singles = [packed_param[m].clone().requires_grad_(True) for m in range(rows)]
    optimizers = [torch.optim.Adam([p], lr=lr) for p in singles]
    packed = PackedAdam([packed_param], lr=lr)
    for step in range(12):
        active = torch.tensor([m for m in range(rows) if (m + step) % 3 != 0 or m == 0])
        grad = torch.randn(rows, width, generator=generator)
        packed_param.grad = grad.clone()
        packed.step(active)
        for m in active.tolist():
            singles[m].grad = grad[m].clone()
            optimizers[m].step()
    for m in range(rows):
        torch.testing.assert_close(packed_param[m], singles[m].detach(), atol=1e-6, rtol=1e-6)
        assert float(packed.steps[m]) == float(optimizers[m].state[singles[m]]["step"])


# ---------------------------------------------------------------- MoMoDistill


def test_binary_kl_is_zero_for_identical_logits_and_positive_otherwise() -> None:
    logits = torch.linspace(-6, 6, 25)
    for temperature in (0.5, 1.0, 3.0):
        same = binary_kl_with_temperature(logits, logits.clone(), temperature)
        assert torch.allclose(same, torch.zeros_like(same), atol=1e-6)
        other = binary_kl_with_temperature(logits, logits + 0.5, temperature)
        assert (other > 0).all()
    # the T² factor: for small differences KL_T ≈ T² · σ'(t/T) · (Δ/T)² / 2 stays comparable across T
    zero, delta = torch.zeros(1, dtype=torch.float64), torch.full((1,), 1e-2, dtype=torch.float64)
    small = [float(binary_kl_with_temperature(zero, delta, t)) for t in (1.0, 4.0)]
    assert small[0] == pytest.approx(small[1], rel=1e-3) and small[0] == pytest.approx(0.25 * 1e-4 / 2, rel=1e-3)


def test_teacher_weights() -> None:
    teachers, base = torch.tensor([0.0, 1.0, 2.0, -1.0]), torch.tensor([0.0, 0.0, 2.5, -1.0])
    patched = torch.tensor([True, True, True, False])
    assert teacher_weights("uniform", teachers, base, patched) is None
    assert teacher_weights("patched", teachers, base, patched).tolist() == [1.0, 1.0, 1.0, 0.0]
    confidence = teacher_weights("confidence", teachers, base, patched)
    assert confidence[0] == 0 and confidence[3] == 0 and confidence[1] > confidence[2] > 0
    assert float(confidence[confidence > 0].mean()) == pytest.approx(1.0)
    assert distill_weight(CloudConfig(beta=0.4, beta_decay=0.5), 2) == pytest.approx(0.1)


def _cloud_model_for(built) -> DIN:
    torch.manual_seed(0)
    meta = built.meta
    spec = ModelSpec(meta.num_items, meta.num_categories, tuple(meta.profile_cardinalities), built.item_category)
    return DIN(spec, ModelConfig())


def test_momodistill_with_zero_beta_is_plain_finetuning(synthetic_small) -> None:
    data = synthetic_small.data
    indices = np.flatnonzero(data.split == SPLIT_TRAIN)[:3000]
    base = _cloud_model_for(synthetic_small)
    config = CloudConfig(finetune_epochs=1, batch_size=256, beta=0.0)
    teachers = torch.randn(len(indices))
    plain, distilled, other = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    finetune(plain, data, indices, config, 20, (0, 1))
    momodistill_step(distilled, data, indices, teachers, config, 20, (0, 1))
    for name, value in plain.state_dict().items():
        assert torch.equal(value, distilled.state_dict()[name]), name
    momodistill_step(other, data, indices, teachers, config, 20, (0, 1), beta=1.0)
    assert not torch.equal(other.output_layer.weight, plain.output_layer.weight)


# ---------------------------------------------------------------- determinism of a whole run

TINY = [
    "runtime.backend=local",
    "data.source=synthetic",
    "data.num_devices=40",
    "data.synthetic.num_items=150",
    "data.eval_negatives=9",
    "rounds=2",
    "cloud.pretrain_epochs=1",
    "cloud.finetune_epochs=1",
    "patch.bootstrap_epochs=1",
    "metrics.split=valid",
    "output.progress=false",
]
COMPARED = ("start_gauc", "device_gauc", "cloud_gauc", "tail_device_gauc", "device_hr10", "cloud_ndcg10")


def _tiny_run(tmp_path: Path, name: str, *overrides: str, cache: str | None = None):
    cache_dir = tmp_path / f"{cache or name}-cache"  # beside the run directory: a run claims its folder whole
    config = load_config(None, [*TINY, f"data.cache_dir={cache_dir}", f"output.out_dir={tmp_path / name}", *overrides])
    return run(config)


def test_dccl_run_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    """Two runs from scratch (separate caches: data, pretraining and bootstrap redone) agree exactly."""
    a = _tiny_run(tmp_path, "a", "strategy=dccl")
    b = _tiny_run(tmp_path, "b", "strategy=dccl")
    for ra, rb in zip(a.records, b.records, strict=True):
        for name in COMPARED:
            assert getattr(ra, name) == getattr(rb, name), name
    for fa, fb in zip(a.device_frames, b.device_frames, strict=True):
        np.testing.assert_array_equal(fa["device_auc"], fb["device_auc"])
        np.testing.assert_array_equal(fa["gate_passed"], fb["gate_passed"])
    assert any(r.device_gauc != r.start_gauc for r in a.records)
    other = _tiny_run(tmp_path, "c", "strategy=dccl", "seed=1")
    assert [r.cloud_gauc for r in other.records] != [r.cloud_gauc for r in a.records]


def test_dccl_with_zero_beta_has_cloud_only_cloud(tmp_path: Path) -> None:
    """MoMoDistill with β = 0 is cloud_only's fine-tuning with the same minibatches: a paired comparison."""
    cloud_only = _tiny_run(tmp_path, "cloud_only", "strategy=cloud_only", cache="shared")
    dccl = _tiny_run(tmp_path, "dccl", "strategy=dccl", "cloud.beta=0", cache="shared")
    assert [r.cloud_gauc for r in cloud_only.records] == [r.cloud_gauc for r in dccl.records]


def test_newest_slice_starts_match_the_per_device_quantile() -> None:
    rng = np.random.default_rng(3)
    sizes = np.array([0, 1, 2, 3, 7, 30, 0, 101])
    ends = np.cumsum(sizes)
    starts = ends - sizes
    # sorted positions per device, with ties (one query's positive and negatives share a position)
    positions = np.concatenate([np.sort(rng.integers(0, 15, size)) for size in sizes])
    for frac in (0.1, 0.3, 0.5, 0.9):
        expected = ends.copy()
        for m, (lo, hi) in enumerate(zip(starts, ends, strict=True)):
            if hi > lo:
                cut = np.quantile(positions[lo:hi], 1.0 - frac, method="higher")
                expected[m] = lo + np.searchsorted(positions[lo:hi], cut)
        np.testing.assert_array_equal(newest_slice_starts(positions, starts, ends, frac), expected)


def test_group_by_device_finds_each_devices_masked_samples_in_storage_order(synthetic_small) -> None:
    data = synthetic_small.data
    mask = (data.split == SPLIT_TRAIN) & (np.arange(data.num_samples) % 3 > 0)
    device_ids = np.sort(np.random.default_rng(0).choice(data.device_ids, 40, replace=False))
    device_ids = np.append(device_ids, data.device_ids.max() + 5)  # a device this data does not hold: no samples
    grouped = group_by_device(data, device_ids, mask)
    for row, device in enumerate(device_ids):
        expected = np.flatnonzero(mask & (data.sample_device == device))
        np.testing.assert_array_equal(grouped.indices[grouped.starts[row] : grouped.ends[row]], expected)
    assert grouped.ends[-1] == len(grouped.indices)


def _bootstrapped(built, table: str, cache_bytes: int, monkeypatch) -> tuple[MetaPatch, list[float]]:
    monkeypatch.setattr(cloud_steps, "Z0_CACHE_BYTES", cache_bytes)
    torch.manual_seed(0)
    meta = built.meta
    model = DIN(ModelSpec(meta.num_items, meta.num_categories, tuple(meta.profile_cardinalities), built.item_category))
    patch = MetaPatch(model.hidden_sizes, K_PATCH, RANK)
    indices = np.flatnonzero(built.data.split == SPLIT_TRAIN)[:3000]
    config = PatchConfig(k=K_PATCH, rank=RANK, bootstrap_epochs=2, bootstrap_table=table)
    losses = cloud_steps.bootstrap_patch(model, patch, built.data, indices, config, 256, 20, seed=0)
    return patch, losses


def test_bootstrap_without_the_z0_cache_and_with_the_lazy_table(ml100k_small, monkeypatch) -> None:
    """z_0 computed per minibatch (at 10^6 devices it would not fit cached) gives the same G; the lazy table (rows
    move only when their user is in the minibatch) learns G too, but is a different optimizer."""
    cached, cached_losses = _bootstrapped(ml100k_small, "adam", 2**31, monkeypatch)
    recomputed, recomputed_losses = _bootstrapped(ml100k_small, "adam", 0, monkeypatch)
    for a, b in zip(cached.parameters(), recomputed.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(cached_losses, recomputed_losses, rtol=1e-5)
    lazy, lazy_losses = _bootstrapped(ml100k_small, "lazy", 0, monkeypatch)
    assert lazy_losses[-1] < lazy_losses[0]
    assert any(not torch.allclose(a, b) for a, b in zip(lazy.parameters(), cached.parameters(), strict=True))


def test_the_gate_falls_back_to_no_patch_not_to_a_bad_starting_patch() -> None:
    """dccl starts a device from θ̃; when the trained patch does not beat θ̂ = 0 (the plain broadcast model) on the
    newest slice, the device keeps θ̂ = 0, never a starting patch that is worse than no patch."""
    model, patch = _models()
    samples = _samples([60, 60], model)
    bad_start = 50.0 * torch.ones(2, K_PATCH)  # far from anything the data supports
    # a learning rate too small to move the patch: the trained patch is the bad start itself
    config = DeviceConfig(gate=True, local_epochs=1, lr=1e-12)
    result = metapatch_device_step(model, patch, samples, bad_start, config, round_context(seed=0, round_index=1))
    assert not result.gate_passed.any()
    assert torch.equal(result.theta, torch.zeros(2, K_PATCH))
