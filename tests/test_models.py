"""Every built-in recommender meets the contract the algorithms rely on (models/base.py), on real ML-100K batches:
MetaPatch's invariants, finite outputs for empty histories, rows independent of their batch, the functional head,
FLOP counts; `model.name` picks the model, and every strategy runs end to end on the second family (SASRec)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.nn import functional
from torch.utils.flop_counter import FlopCounterMode

from dccl_sim import plugins
from dccl_sim.config import ConfigError, ModelConfig, SimConfig, load_config
from dccl_sim.data.device_data import Batch
from dccl_sim.models import factory
from dccl_sim.models.base import ModelSpec, Recommender
from dccl_sim.models.din import DIN
from dccl_sim.models.metapatch import MetaPatch, row_tiles
from dccl_sim.models.sasrec import SASRec

sys.path.insert(0, str(Path(__file__).parent / "reference"))
from record import SETTINGS, STRATEGIES

MODELS = ("din", "sasrec")
L = 20


def _spec(built) -> ModelSpec:
    meta = built.meta
    return ModelSpec(meta.num_items, meta.num_categories, tuple(meta.profile_cardinalities), built.item_category)


def _model(built, name: str, seed: int = 0, settings=None) -> Recommender:
    torch.manual_seed(seed)
    return plugins.resolve(plugins.MODEL, name)(_spec(built), ModelConfig(), settings).eval()


def _batch(built, n: int = 512) -> Batch:
    """n samples spread over the devices; each device's first samples have empty or short histories."""
    indices = np.linspace(0, built.data.num_samples - 1, n).astype(np.int64)
    batch = built.data.batch(indices, L)
    assert (batch.history == 0).all(1).any() and (batch.history > 0).all(1).any()
    return batch


def _rows(batch: Batch, rows: torch.Tensor) -> Batch:
    return Batch(batch.item[rows], batch.history[rows], batch.profile[rows], batch.label[rows])


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_built_in_models_are_found_by_name() -> None:
    assert plugins.builtins(plugins.MODEL) == {"din": DIN, "sasrec": SASRec}
    assert plugins.MODEL in plugins.KINDS
    assert plugins.settings_key(SASRec) == "sasrec" and plugins.settings_key(DIN) is None


@pytest.mark.parametrize("name", MODELS)
def test_zero_meta_patch_is_the_model_and_its_gradient_is_not_zero(ml100k_small, name: str) -> None:
    model = _model(ml100k_small, name).requires_grad_(False)
    batch = _batch(ml100k_small)
    x = model.features(batch)
    patch = MetaPatch(model.hidden_sizes, k=16, rank=8)
    theta = torch.zeros(len(batch), 16, requires_grad=True)
    logits = model.head(x, patch.patch(theta))
    assert torch.equal(logits, model(batch))
    device = np.arange(len(batch)) % 7
    grouped = model.head(x, patch.grouped_patch(torch.zeros(7, 16), row_tiles(device)))
    assert torch.equal(grouped, logits)
    (grad,) = torch.autograd.grad(functional.binary_cross_entropy_with_logits(logits, batch.label), theta)
    assert grad.abs().sum(1).gt(0).all()


@pytest.mark.parametrize("name", MODELS)
def test_empty_histories_give_finite_outputs_and_gradients(ml100k_small, name: str) -> None:
    model = _model(ml100k_small, name).train()
    batch = _batch(ml100k_small, 64)
    empty = Batch(batch.item, torch.zeros_like(batch.history), batch.profile, batch.label)
    x = model.features(empty)
    d = ModelConfig().embed_dim
    assert torch.equal(x[:, :d], torch.zeros(len(batch), d))  # no history: a zero history representation
    logits = model(empty)
    assert torch.isfinite(logits).all()
    functional.binary_cross_entropy_with_logits(logits, batch.label).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", MODELS)
def test_an_empty_batch_scores_to_an_empty_tensor(ml100k_small, name: str) -> None:
    model = _model(ml100k_small, name)
    empty = _rows(_batch(ml100k_small, 64), torch.arange(0))
    assert model.features(empty).shape == (0, model.input_dim)
    assert model(empty).shape == (0,)


@pytest.mark.parametrize("name", MODELS)
def test_a_sample_does_not_depend_on_its_batch(ml100k_small, name: str) -> None:
    """Placement invariance: a sample's x and logit are the same alone, in any subset, in any order (1e-6)."""
    model = _model(ml100k_small, name)
    batch = _batch(ml100k_small)
    with torch.no_grad():
        x, logits = model.features(batch), model(batch)
        order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(model.features(_rows(batch, order)), x[order], rtol=0, atol=1e-6)
        few = order[:37]  # mostly short histories in a small batch: DIN takes its other (ragged) path
        torch.testing.assert_close(model.features(_rows(batch, few)), x[few], rtol=0, atol=1e-6)
        for row in (0, 1, 100, len(batch) - 1):
            alone = torch.tensor([row])
            torch.testing.assert_close(model(_rows(batch, alone)), logits[alone], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_functional_head_equals_the_head_in_value_and_gradient(ml100k_small, name: str) -> None:
    model = _model(ml100k_small, name)
    x = model.features(_batch(ml100k_small)).detach()
    names = model.head_parameter_names()
    layers = len(model.hidden_layers)
    assert names == [f"hidden_layers.{i}.{p}" for i in range(layers) for p in ("weight", "bias")] + [
        "output_layer.weight",
        "output_layer.bias",
    ]
    parameters = dict(model.named_parameters())
    params = {n: parameters[n].detach().clone().requires_grad_() for n in names}
    assert torch.equal(model.functional_head(params, x), model.head(x))
    got = torch.autograd.grad(model.functional_head(params, x).sum(), list(params.values()))
    want = torch.autograd.grad(model.head(x).sum(), [parameters[n] for n in names])
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    # a per-device copy moves on its own: torch.func's gradient of the copy, the module untouched
    grads = torch.func.grad(lambda p: model.functional_head(p, x).sum())(params)
    assert set(grads) == set(names)


def test_din_flops_are_the_latency_models(ml100k_small) -> None:
    """The deployment model's per-sample FLOPs, worked by hand for the defaults (d = 32, attention 4d → 36 → 1,
    3 profile fields of 8, top MLP 120 → 200 → 80 → 1, k = r = 16) at L = 20."""
    assert L == 20 and len(ml100k_small.meta.profile_cardinalities) == 3
    model = _model(ml100k_small, "din")
    assert model.feature_flops(L) == 20 * (2 * 128 * 36 + 2 * 36 * 1) + 4 * 20 * 32 == 188_320
    assert model.head_flops() == 2 * 120 * 200 + 2 * 200 * 80 + 2 * 80 == 80_160
    assert model.first_hidden_flops() == 2 * 120 * 200
    patch = MetaPatch(model.hidden_sizes, SimConfig().patch.k, SimConfig().patch.rank)
    assert patch.flops_per_sample() == sum(2 * h * 16 + 2 * 16 * 16 * h for h in (200, 80)) == 152_320


@pytest.mark.parametrize("name", MODELS)
def test_head_and_patch_flops_are_what_torch_counts(ml100k_small, name: str) -> None:
    """The top MLP and the per-sample patch: exactly the FLOPs FlopCounterMode counts (their matrix products)."""
    model = _model(ml100k_small, name).requires_grad_(False)
    batch = _batch(ml100k_small)
    x = model.features(batch)
    n = len(batch)
    assert _flops(lambda: model.head(x)) == n * model.head_flops()
    assert _flops(lambda: model.first_hidden(x)) == n * model.first_hidden_flops()
    patch = MetaPatch(model.hidden_sizes, k=16, rank=8).requires_grad_(False)
    z0, theta = model.first_hidden(x), torch.randn(n, 16)
    patched = _flops(lambda: model.head_from_first(z0, patch.patch(theta))) - _flops(lambda: model.head_from_first(z0))
    assert patched == n * patch.flops_per_sample()


def test_din_feature_flops_bound_what_torch_counts(ml100k_small) -> None:
    """DIN's formula counts the model as defined (the attention MLP on the [V, 4d] concatenation, plus 4·L·d
    element-wise); its implementation splits the first layer by block and projects the history per item, so the
    matrix products torch counts are fewer, but of the same order: between a tenth of the formula and all of it.
    Counted with gradients on: without, the history-target product goes through an in-place addmm_, which
    FlopCounterMode does not count."""
    model = _model(ml100k_small, "din")
    batch = _batch(ml100k_small, 1024)
    counted = _flops(lambda: model.features(batch)) / len(batch)
    assert model.feature_flops(L) / 10 <= counted <= model.feature_flops(L)


@pytest.mark.parametrize(("blocks", "heads", "length"), [(2, 1, L), (1, 2, L), (3, 4, 7)])
def test_sasrec_feature_flops_are_what_torch_counts(ml100k_small, blocks: int, heads: int, length: int) -> None:
    """SASRec's formula counts its matrix products exactly; the element-wise rest is a few per cent."""
    model = _model(ml100k_small, "sasrec", settings=SASRec.Settings(blocks=blocks, heads=heads))
    batch = _batch(ml100k_small, 256)
    short = Batch(batch.item, batch.history[:, -length:], batch.profile, batch.label)
    with torch.no_grad():
        assert _flops(lambda: model.features(short)) == len(batch) * model.feature_flops(length)


def test_sasrec_reads_right_aligned_histories_up_to_max_len(ml100k_small) -> None:
    model = _model(ml100k_small, "sasrec", settings=SASRec.Settings(max_len=10))
    batch = _batch(ml100k_small, 8)
    with pytest.raises(ValueError, match=r"history length 20 exceeds sasrec\.max_len"):
        model(batch)
    shifted = batch.history[:, -10:].roll(3, dims=1)
    shifted[:, -3:] = 0
    with pytest.raises(ValueError, match="right-aligned"):
        model(Batch(batch.item, shifted, batch.profile, batch.label))
    with pytest.raises(ValueError, match=r"sasrec.heads \(3\) must divide model.embed_dim \(32\)"):
        _model(ml100k_small, "sasrec", settings=SASRec.Settings(heads=3))


def test_build_models_picks_the_named_model_with_its_settings(ml100k_small) -> None:
    spec = _spec(ml100k_small)
    din = factory.build_models(spec, SimConfig(), seed=0).cloud
    sasrec = factory.build_models(spec, load_config(None, ["model.name=sasrec"]), seed=0).cloud
    assert type(din) is DIN and type(sasrec) is SASRec
    assert sasrec.settings == SASRec.Settings() and len(sasrec.blocks) == SASRec.Settings().blocks
    again = factory.build_models(spec, load_config(None, ["model.name=sasrec"]), seed=0).cloud
    assert all(torch.equal(a, b) for a, b in zip(sasrec.parameters(), again.parameters(), strict=True))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nope", "model.name: unknown model 'nope'; choose one of din, sasrec, or name your own as module:Attribute"),
        ("nope_module:X", "model.name: model 'nope_module:X': no module named 'nope_module' in the current directory"),
        ("dccl_sim.models.base:ModelSpec", "model.name: model 'dccl_sim.models.base:ModelSpec' is not a Recommender"),
    ],
)
def test_unknown_models_fail_at_config_validation(name: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"model.name={name}"])
    assert message in str(error.value)


def test_a_users_model_is_loaded_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ml100k_small
) -> None:
    (tmp_path / "my_models.py").write_text(
        "from dccl_sim.models.din import DIN\n\n\nclass Wide(DIN):\n    name = 'wide'\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the loader may add the current directory: undo it after
    monkeypatch.delitem(sys.modules, "my_models", raising=False)
    config = load_config(None, ["model.name=my_models:Wide", "model.mlp_hidden=[300]"])
    model = factory.build_models(_spec(ml100k_small), config, seed=0).cloud
    assert type(model).__name__ == "Wide" and model.hidden_sizes == [300]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs_on_sasrec(strategy: str, tmp_path: Path) -> None:
    """The real round loop (in-process runtime) on 20 ML-100K users, 2 rounds: finite metrics every round."""
    settings = [s for s in SETTINGS if not s.startswith("data.num_devices")] + ["data.num_devices=20"]
    from dccl_sim.runtime.session import run

    run(load_config(None, [*settings, "model.name=sasrec", f"strategy={strategy}", f"output.out_dir={tmp_path}"]))
    rounds = pq.read_table(tmp_path / "rounds.parquet").to_pydict()
    assert rounds["round"] == [0, 1]
    for column in ("start_gauc", "device_gauc", "cloud_auc", "cloud_gauc", "device_hr10", "cloud_ndcg10"):
        assert all(0.0 < value <= 1.0 for value in rounds[column]), column
    rounds.pop("t_setup_s")  # the first round's only, NaN on the others by design
    numbers = [v for values in rounds.values() for v in values if isinstance(v, float)]
    assert all(math.isfinite(v) for v in numbers)
