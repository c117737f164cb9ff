"""Plug-ins from outside the package: a user's strategy and model (the files in examples/) named as module:Class,
validated like the built-ins, shipped to the Ray actors, placement-invariant and resumable; the second built-in
model family (sasrec) holds the same invariants."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from bench.common import torch_threads
from test_runtime import SMALL, assert_same_results

from dccl_sim.config import ConfigError, load_config
from dccl_sim.runtime.session import resume_state, run

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def in_examples(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Work from examples/, as a user running `dccl-sim run` beside their plug-in file does."""
    monkeypatch.chdir(EXAMPLES)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return EXAMPLES


def _config(out: Path, *overrides: str):
    return load_config(None, [*SMALL, f"output.out_dir={out}", *overrides])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy=no_such_module:Thing"], "no module named 'no_such_module'"),
        (["strategy=fedprox:Missing"], "module 'fedprox' has no attribute 'Missing'"),
        (["strategy=json:dumps"], "strategy 'json:dumps' is not a Strategy"),
        (["model.name=fedprox:FedProx"], "model 'fedprox:FedProx' is not a Recommender"),
        (["strategy=fedprox:FedProx", "fedprox.mu=-1"], "fedprox.mu: Input should be greater than or equal to 0"),
        (["strategy=fedprox:FedProx", "fedprox.bogus=1"], "fedprox.bogus: unknown key"),
        (["fedprox.mu=0.1"], "fedprox: unknown key"),
    ],
)
def test_bad_plugins_are_named_with_the_reason(in_examples: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert message in str(error.value)


def test_a_plugin_that_fails_on_import_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('needs a GPU')\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"importing 'broken_plugin' failed: RuntimeError: needs a GPU"):
        load_config(None, ["strategy=broken_plugin:Anything"])


def test_fedprox_with_mu_zero_is_fedavg_and_its_proximal_term_changes_the_models(
    in_examples: Path, tmp_path: Path
) -> None:
    local = "runtime.backend=local"
    fedavg = run(_config(tmp_path / "fedavg", local, "strategy=fedavg"))
    plain = run(_config(tmp_path / "mu0", local, "strategy=fedprox:FedProx", "fedprox.mu=0"))
    prox = run(_config(tmp_path / "mu1", local, "strategy=fedprox:FedProx", "fedprox.mu=1.0"))
    for name in ("device_gauc", "cloud_gauc", "cloud_auc"):
        assert [getattr(r, name) for r in plain.records] == [getattr(r, name) for r in fedavg.records], name
    assert [r.cloud_auc for r in prox.records] != [r.cloud_auc for r in fedavg.records]
    saved = json.loads((tmp_path / "mu1" / "config.json").read_text())
    assert saved["strategy"] == "fedprox:FedProx" and saved["fedprox"] == {"mu": 1.0}


@pytest.mark.parametrize(
    "plugin",
    [
        ["strategy=fedprox:FedProx", "fedprox.mu=0.1"],
        ["model.name=mean_pool_model:MeanPool", "strategy=dccl"],
        ["model.name=sasrec", "strategy=dccl"],
    ],
    ids=["strategy", "model", "builtin-sasrec"],
)
def test_a_plugin_on_ray_equals_the_in_process_run_and_resumes(
    in_examples: Path, ray_session, tmp_path: Path, plugin: list[str]
) -> None:
    """Two device actors on Ray import the plug-in from the module shipped with the runtime environment (the
    workers' own path does not hold examples/), and give the in-process results; a run stopped after round 0 and
    resumed gives the uninterrupted run's. The actors train on one thread each and so do the in-process runs here:
    Adam on whole-model copies (FedProx) carries the float differences of another reduction order into the
    weights."""
    run(_config(tmp_path / "ray", "runtime.num_actors=2", "runtime.torch_threads=1", *plugin))
    with torch_threads(1):
        run(_config(tmp_path / "local", "runtime.backend=local", *plugin))
        run(_config(tmp_path / "stopped", "runtime.backend=local", "rounds=1", *plugin))
        config, state = resume_state(tmp_path / "stopped", ["rounds=2"])
        run(config, state)
    assert_same_results(tmp_path / "local", tmp_path / "ray")
    assert_same_results(tmp_path / "local", tmp_path / "stopped")
    rounds = pq.read_table(tmp_path / "ray" / "rounds.parquet").to_pydict()
    assert np.isfinite(rounds["device_gauc"]).all() and rounds["n_participants"] == [8, 8]
