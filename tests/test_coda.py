"""CoDA (docs/design.md §4, `coda`): config, retrieval, the device's filter, packed == single, whole runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_aucs_within_one_pair, round_context

from dccl_sim.algorithms.cloud_steps import features_of
from dccl_sim.algorithms.coda import (
    Candidates,
    augmented_samples,
    candidate_table,
    classifier_scores,
    coda_device_step,
    draw_candidates,
    nearest_users,
    select_candidates,
    user_representations,
)
from dccl_sim.algorithms.metapatch_step import LocalSamples, loss_per_device
from dccl_sim.config import ConfigError, DeviceConfig, ModelConfig, load_config
from dccl_sim.data.device_data import SPLIT_TRAIN
from dccl_sim.models.base import ModelSpec
from dccl_sim.models.din import DIN
from dccl_sim.models.metapatch import MetaPatch
from dccl_sim.runtime.ray_runtime import RayRuntime
from dccl_sim.runtime.session import resume_state, run
from dccl_sim.strategies.coda import CoDA
from dccl_sim.strategies.coda import CodaSettings as CodaConfig

K_PATCH = 8


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["coda.neighbours=0"], "coda.neighbours: Input should be greater than 0"),
        (["coda.candidates=-3"], "coda.candidates: Input should be greater than 0"),
        (["coda.filter=oracle"], "coda.filter: Input should be 'classifier' or 'none'"),
        (["coda.threshold=0.6"], "set exactly one of coda.threshold and coda.keep_frac"),
        (["coda.keep_frac=null"], "set exactly one of coda.threshold and coda.keep_frac"),
        (["coda.threshold=1.0", "coda.keep_frac=null"], "coda.threshold: Input should be less than 1"),
        (["coda.keep_frac=0"], "coda.keep_frac: Input should be greater than 0"),
        (["coda.weight=0"], "coda.weight: Input should be greater than 0"),
        (["coda.feature_dtype=int8"], "coda.feature_dtype: Input should be 'float16' or 'float32'"),
    ],
)
def test_bad_coda_settings_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert message in str(error.value)


def test_coda_settings_that_run() -> None:
    assert load_config(None, ["strategy=coda"]).coda == CodaConfig()
    coda = ["strategy=coda"]
    assert load_config(None, [*coda, "coda.threshold=0.6", "coda.keep_frac=null"]).coda.threshold == 0.6
    assert load_config(None, [*coda, "coda.filter=none", "coda.keep_frac=null"]).coda.filter == "none"
    # another strategy's run validates a coda section (a comparison may set it for every strategy) but keeps none
    dccl = load_config(None, ["coda.filter=none", "coda.keep_frac=null"])
    assert "coda" not in dccl.model_dump() and "coda" in load_config(None, coda).model_dump()


# ---------------------------------------------------------------- cloud: retrieval


def _cloud_model(built) -> DIN:
    torch.manual_seed(0)
    meta = built.meta
    spec = ModelSpec(meta.num_items, meta.num_categories, tuple(meta.profile_cardinalities), built.item_category)
    return DIN(spec, ModelConfig())


def _pool(data, round_index: int) -> np.ndarray:
    """What the cloud holds at round t's broadcast: every training sample of the windows before t."""
    return (data.split == SPLIT_TRAIN) & (data.windows(5, 0.5) < round_index)


def _retrieve(built, device_ids: np.ndarray, round_index: int = 1, count: int = 40, neighbours: int = 5):
    data, pool = built.data, _pool(built.data, round_index)
    reps = user_representations(_cloud_model(built), data, pool, history_len=20)
    nearest = nearest_users(reps, data.rows_of(device_ids), neighbours)
    return (
        reps,
        nearest,
        draw_candidates(
            data,
            pool,
            nearest,
            device_ids,
            count,
            round_context(seed=0, round_index=round_index).keys("coda_candidates"),
        ),
    )


def test_retrieval_takes_only_other_users_pooled_training_samples(synthetic_small) -> None:
    data = synthetic_small.data
    everyone = data.device_ids
    _, nearest, (offsets, samples) = _retrieve(synthetic_small, everyone)
    pool = _pool(data, 1)
    assert len(offsets) == len(everyone) + 1 and offsets[-1] == len(samples) > 0
    assert pool[samples].all()  # training split, windows before t: never validation, test or the current window
    owner = np.repeat(everyone, np.diff(offsets))
    assert not np.any(data.sample_device[samples] == owner)
    for q in range(len(everyone)):
        mine = samples[offsets[q] : offsets[q + 1]]
        from_users = np.isin(data.sample_device[mine], data.device_ids[nearest[q][nearest[q] >= 0]])
        assert from_users.all() and len(np.unique(mine)) == len(mine)
        available = pool[np.isin(data.sample_device, data.device_ids[nearest[q][nearest[q] >= 0]])].sum()
        assert len(mine) == min(40, available)


def test_neighbours_are_the_most_cosine_similar_users(synthetic_small) -> None:
    reps, nearest, _ = _retrieve(synthetic_small, synthetic_small.data.device_ids[:7])
    similarity = (reps @ reps.T).numpy()
    has_rep = np.abs(reps.numpy()).sum(1) > 0
    for q in range(7):
        others = np.flatnonzero(has_rep & (np.arange(len(reps)) != q))
        best = others[np.argsort(-similarity[q, others], kind="stable")[:5]]
        np.testing.assert_allclose(np.sort(similarity[q, nearest[q]]), np.sort(similarity[q, best]), atol=1e-6)
        assert q not in nearest[q]


def test_retrieval_is_seeded_and_independent_of_who_else_asks(synthetic_small) -> None:
    data = synthetic_small.data
    everyone = data.device_ids
    _, _, (offsets, samples) = _retrieve(synthetic_small, everyone)
    _, _, (again_offsets, again) = _retrieve(synthetic_small, everyone)
    assert np.array_equal(offsets, again_offsets) and np.array_equal(samples, again)
    some = everyone[[3, 50, 51, 299]]
    _, _, (sub_offsets, sub) = _retrieve(synthetic_small, some)
    for q, device in enumerate(some):
        row = int(np.searchsorted(everyone, device))
        assert np.array_equal(sub[sub_offsets[q] : sub_offsets[q + 1]], samples[offsets[row] : offsets[row + 1]])
    _, _, (_, later) = _retrieve(synthetic_small, some, round_index=2)
    assert not np.array_equal(sub, later)


def test_candidates_travel_as_their_features_in_the_wire_dtype(synthetic_small) -> None:
    data, model = synthetic_small.data, _cloud_model(synthetic_small)
    _, _, (offsets, samples) = _retrieve(synthetic_small, data.device_ids[:20])
    table = candidate_table(model, data, offsets, samples, 20, "float16")
    assert table.features.dtype == np.float16 and len(table.label) == len(np.unique(samples)) < len(samples)
    x, label, counts = table.of(data.device_ids[:20], data.device_ids[[4, 2]])
    mine = np.concatenate([samples[offsets[4] : offsets[5]], samples[offsets[2] : offsets[3]]])
    assert counts.tolist() == [offsets[5] - offsets[4], offsets[3] - offsets[2]]
    torch.testing.assert_close(x, features_of(model, data, mine, 20), atol=2e-3, rtol=1e-3)
    assert label.tolist() == data.label[mine].tolist()
    config = load_config(None, ["strategy=coda"])
    wire = table.features.shape[1] * table.features.itemsize + table.label.itemsize
    assert CoDA(config).candidate_bytes(model.input_dim) == wire


def test_a_user_without_pooled_samples_is_nobody_s_neighbour() -> None:
    reps = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.9, 0.1], [-1.0, 0.0]])
    nearest = nearest_users(torch.nn.functional.normalize(reps, dim=1), np.array([0, 1, 3]), count=3)
    assert nearest[0].tolist() == [2, 3, -1]
    assert 1 not in nearest[2] and nearest[2].tolist() == [2, 0, -1]


# ---------------------------------------------------------------- device: filter


def test_the_classifier_keeps_the_candidates_that_look_local() -> None:
    """Locals around +μ; half of the candidates look local (around +μ), half do not (around −μ)."""
    generator = torch.Generator().manual_seed(0)
    mu = torch.zeros(6)
    mu[:3] = 1.0
    local = mu + 0.3 * torch.randn(20, 6, generator=generator)
    alike, unlike = (
        mu + 0.3 * torch.randn(10, 6, generator=generator),
        -mu + 0.3 * torch.randn(10, 6, generator=generator),
    )
    candidates = torch.cat([unlike[:5], alike, unlike[5:]])
    config = CodaConfig(classifier_steps=100)
    scores, trained = classifier_scores(local, np.array([20]), candidates, np.array([20]), config)
    assert trained.tolist() == [True]
    keep = select_candidates(scores, np.array([20]), config)
    assert keep.tolist() == [False] * 5 + [True] * 10 + [False] * 5
    assert (scores[5:15] > scores[:5].max()).all() and (scores[5:15] > scores[15:].max()).all()


def test_selection_rules() -> None:
    scores = torch.tensor([0.9, 0.2, 0.6, 0.4, 0.7, math.nan, math.nan, 0.1, 0.55])
    counts = np.array([5, 2, 0, 2])  # device 1's classifier did not train (NaN), device 2 got nothing
    top = select_candidates(scores, counts, CodaConfig(keep_frac=0.5))
    assert top.tolist() == [True, False, True, False, True, False, False, False, True]  # ⌈2.5⌉ = 3 and ⌈1⌉ = 1
    threshold = select_candidates(scores, counts, CodaConfig(threshold=0.65, keep_frac=None))
    assert threshold.tolist() == [True, False, False, False, True, False, False, False, False]
    everything = select_candidates(scores, counts, CodaConfig(filter="none"))
    assert everything.all() and len(everything) == counts.sum()
    for keep in (top, threshold):  # never more than a device's candidates
        assert (np.bincount(np.repeat(np.arange(4), counts)[keep], minlength=4) <= counts).all()


# ---------------------------------------------------------------- device: packed == single


def _models() -> tuple[DIN, MetaPatch]:
    torch.manual_seed(0)
    spec = ModelSpec(30, 3, (2, 4), np.arange(31) % 3)
    model = DIN(spec, ModelConfig(embed_dim=8, mlp_hidden=(24, 12)))
    patch = MetaPatch(model.hidden_sizes, K_PATCH, 4)
    return model.requires_grad_(False).eval(), patch.requires_grad_(False).eval()


def _device_data(model: DIN, sizes: list[int], candidate_counts: list[int]):
    """Local x and candidates for devices of the given sizes; labels depend on the device so patches learn."""
    generator = torch.Generator().manual_seed(1)
    total = sum(sizes)
    local_x = torch.randn(total, model.input_dim, generator=generator)
    device = np.repeat(np.arange(len(sizes)), sizes)
    sign = torch.from_numpy(np.where(device % 2 == 0, 1.0, -1.0)).float()
    label = (torch.rand(total, generator=generator) < torch.sigmoid(sign * local_x[:, :4].sum(1))).float()
    ends = np.cumsum(sizes).astype(np.int64)
    starts = ends - np.asarray(sizes)
    local = LocalSamples(
        z0=model.first_hidden(local_x),
        label=label,
        starts=starts,
        ends=ends,
        holdout_start=starts + np.floor(0.7 * np.asarray(sizes)).astype(np.int64),
        device_ids=np.arange(200, 200 + len(sizes), dtype=np.int64),
    )
    count = sum(candidate_counts)
    x = 0.5 * torch.randn(count, model.input_dim, generator=generator) + 0.3
    candidates = Candidates(x, (torch.rand(count, generator=generator) < 0.4).float(), np.asarray(candidate_counts))
    return local, local_x, candidates


def _one(local: LocalSamples, local_x: torch.Tensor, candidates: Candidates, m: int):
    """Device m's samples, features and candidates by themselves."""
    c_lo, c_hi = int(candidates.counts[:m].sum()), int(candidates.counts[: m + 1].sum())
    own = Candidates(candidates.x[c_lo:c_hi], candidates.label[c_lo:c_hi], candidates.counts[m : m + 1])
    return local.alone(m), local_x[local.starts[m] : local.ends[m]], own


@pytest.mark.parametrize(
    ("gate", "coda"),
    [
        (True, CodaConfig()),
        (False, CodaConfig(threshold=0.5, keep_frac=None, weight=0.3)),
        (True, CodaConfig(filter="none", keep_frac=None)),
    ],
)
def test_packed_coda_step_equals_single_device_steps(gate: bool, coda: CodaConfig) -> None:
    model, patch = _models()
    sizes, counts = [1, 2, 5, 33, 150, 1500, 64, 9], [7, 0, 64, 64, 20, 64, 1, 64]
    local, local_x, candidates = _device_data(model, sizes, counts)
    device = DeviceConfig(gate=gate, local_epochs=2, batch_size=16)
    start = torch.zeros(len(sizes), K_PATCH)
    args = (device, coda, 3 * 8, round_context(seed=5, round_index=1))
    packed = coda_device_step(model, patch, local, local_x, candidates, start, *args)
    c_start = np.cumsum(counts) - counts
    for m in range(len(sizes)):
        alone, x, own = _one(local, local_x, candidates, m)
        single = coda_device_step(model, patch, alone, x, own, start[m : m + 1], *args)
        torch.testing.assert_close(packed.theta[m : m + 1], single.theta, atol=1e-5, rtol=0)
        assert np.array_equal(packed.keep[c_start[m] : c_start[m] + counts[m]], single.keep)
        for name in ("gate_passed", "n_kept", "classifier_passes", "samples_trained"):
            assert getattr(packed, name)[m] == getattr(single, name)[0], name
    assert (packed.n_kept <= np.asarray(counts)).all() and packed.theta.abs().sum() > 0
    if coda.filter == "none":
        assert packed.n_kept.tolist() == counts and packed.classifier_passes.sum() == 0
    else:
        assert 0 < packed.n_kept.sum() < sum(counts)


def test_kept_candidates_come_first_and_the_gate_checks_only_local_data() -> None:
    model, _ = _models()
    local, _, candidates = _device_data(model, [4, 6], [3, 2])
    keep = np.array([True, False, True, True, True])
    kept_z0 = model.first_hidden(candidates.x[torch.from_numpy(np.flatnonzero(keep))])
    samples = augmented_samples(local, kept_z0, candidates, keep, weight=0.25)
    assert samples.starts.tolist() == [0, 6] and samples.ends.tolist() == [6, 14]
    assert samples.weight.tolist() == [0.25, 0.25, 1, 1, 1, 1] + [0.25, 0.25] + [1.0] * 6
    torch.testing.assert_close(samples.z0[2:6], local.z0[0:4])
    torch.testing.assert_close(samples.z0[:2], kept_z0[:2])
    assert (samples.holdout_start - samples.starts).tolist() == [2 + 2, 2 + 4]  # 2 kept + the older 70 %
    torch.testing.assert_close(samples.z0[samples.holdout_start[1] : 14], local.z0[local.holdout_start[1] : 10])


def test_unit_weights_are_the_plain_mean() -> None:
    model, patch = _models()
    z0 = torch.relu(torch.randn(12, model.hidden_sizes[0]))
    label, device = (torch.arange(12) % 2).float(), torch.tensor([0] * 5 + [2] * 7)
    theta = 0.1 * torch.randn(3, K_PATCH)
    plain = loss_per_device(model, patch, z0, label, device, theta)
    weighted = loss_per_device(model, patch, z0, label, device, theta, torch.ones(12))
    torch.testing.assert_close(plain, weighted)
    # weight 3 on a row counts it three times
    repeated, one_device = torch.tensor([0, 1, 0, 1, 0, 1, 2, 3, 4]), torch.zeros(9, dtype=torch.int64)
    expected = loss_per_device(model, patch, z0[repeated], label[repeated], one_device, theta[:1])
    weight = torch.tensor([3.0, 3.0, 1.0, 1.0, 1.0])
    actual = loss_per_device(model, patch, z0[:5], label[:5], one_device[:5], theta[:1], weight)
    torch.testing.assert_close(actual, expected)


# ---------------------------------------------------------------- whole runs

SMALL = [
    "strategy=coda",
    "data.num_devices=8",
    "data.eval_negatives=9",
    "rounds=2",
    "cloud.pretrain_epochs=1",
    "patch.bootstrap_epochs=1",
    "coda.neighbours=3",
    "coda.candidates=16",
    "output.progress=false",
]


def _config(out: Path, *overrides: str):
    return load_config(None, [*SMALL, f"output.out_dir={out}", *overrides])


def _devices(out: Path) -> dict[str, list]:
    import pyarrow.parquet as pq

    return pq.read_table(out / "devices.parquet").to_pydict()


def test_a_coda_run_reports_its_overheads(tmp_path: Path) -> None:
    state = run(_config(tmp_path / "coda", "runtime.backend=local"))
    devices = _devices(tmp_path / "coda")
    per_candidate = CoDA(_config(tmp_path)).candidate_bytes(3 * 32 + 3 * 8)
    assert per_candidate == (3 * 32 + 3 * 8) * 2 + 1  # x in float16 and a label byte
    n_candidates, n_kept = np.array(devices["n_candidates"]), np.array(devices["n_kept"])
    assert (n_candidates == 16).all() and ((n_kept > 0) & (n_kept <= 16)).all()
    assert np.array_equal(devices["candidate_bytes"], n_candidates * per_candidate)
    assert (np.array(devices["classifier_s"]) > 0).all()
    assert (np.array(devices["classifier_s"]) < np.array(devices["compute_s"])).all()
    assert (np.array(devices["flops"]) > 0).all()
    for record in state.records:
        assert record.candidates_per_device == 16 and record.candidate_bytes_per_device == 16 * per_candidate
        assert record.broadcast_bytes == 8 * (record.download_bytes_per_device + 16 * per_candidate)
        assert record.device_gauc != record.start_gauc
    assert [r.kept_per_device for r in state.records] == [n_kept[:8].mean(), n_kept[8:].mean()]
    plain = run(_config(tmp_path / "none", "runtime.backend=local", "coda.filter=none", "coda.keep_frac=null"))
    devices = _devices(tmp_path / "none")
    assert devices["n_kept"] == devices["n_candidates"] and set(devices["classifier_s"]) == {0.0}
    assert [r.kept_per_device for r in plain.records] == [16.0, 16.0]


def test_other_strategies_record_no_coda_columns(tmp_path: Path) -> None:
    """CoDA's columns are CoDA's own: a metapatch run's tables do not carry them."""
    state = run(_config(tmp_path / "mp", "runtime.backend=local", "strategy=metapatch", "rounds=1"))
    devices = _devices(tmp_path / "mp")
    assert not {"n_candidates", "n_kept", "candidate_bytes", "classifier_s"} & set(devices)
    assert "candidates_per_device" not in state.records[0].model_dump()


def test_coda_resumes_with_the_pool_it_held(tmp_path: Path) -> None:
    """The cloud's pool grows with each round's uploads; a resumed run retrieves from the same pool."""
    common = ["runtime.backend=local", "data.windows=3"]
    straight = run(_config(tmp_path / "straight", *common, "rounds=3"))
    run(_config(tmp_path / "stopped", *common))
    config, state = resume_state(tmp_path / "stopped", ["rounds=3"])
    resumed = run(config, state)
    for name in ("device_gauc", "cloud_gauc"):
        got, want = ([getattr(r, name) for r in s.records] for s in (resumed, straight))
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)
    assert _devices(tmp_path / "stopped")["n_kept"] == _devices(tmp_path / "straight")["n_kept"]


def test_coda_placement_does_not_change_results(tmp_path: Path, ray_session) -> None:
    """One device per pack in-process against two packed Ray actors: the same candidates, kept samples and models."""
    run(_config(tmp_path / "single", "runtime.backend=local", "runtime.devices_per_actor=1"))
    run(_config(tmp_path / "packed", "runtime.num_actors=2"), runtime=RayRuntime())
    single, packed = _devices(tmp_path / "single"), _devices(tmp_path / "packed")
    for name in ("device_id", "n_candidates", "n_kept", "gate_passed"):
        assert single[name] == packed[name], name
    negatives = json.loads((tmp_path / "single" / "config.json").read_text())["data"]["eval_negatives"]
    for name in ("start_auc", "device_auc", "cloud_auc"):  # the cloud trains on 1 thread in-process, on 2 on Ray
        assert_aucs_within_one_pair(packed[name], single[name], single["n_test"], negatives, name)
