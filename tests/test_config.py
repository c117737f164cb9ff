"""Configuration: defaults, files, dotted overrides and clear errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dccl_sim.config import ConfigError, SimConfig, load_config


def test_defaults_run_out_of_the_box() -> None:
    config = load_config()
    assert config == SimConfig()
    assert config.strategy == "dccl" and config.data.source == "ml100k" and config.patch.k == 16


def test_toml_and_yaml_files_and_overrides(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('seed = 7\nstrategy = "metapatch"\n[device]\nlocal_epochs = 3\n')
    yaml = tmp_path / "c.yaml"
    yaml.write_text("seed: 7\nstrategy: metapatch\ndevice:\n  local_epochs: 3\n")
    assert load_config(toml) == load_config(yaml)
    config = load_config(toml, ["device.local_epochs=2", "cloud.beta=0.5", "runtime.devices_per_actor=1"])
    assert (config.seed, config.device.local_epochs, config.cloud.beta) == (7, 2, 0.5)
    assert config.runtime.devices_per_actor == 1
    assert load_config(None, ["model.mlp_hidden=[64, 32]"]).model.mlp_hidden == (64, 32)
    assert load_config(None, ["runtime.deadline_s=2.5"]).runtime.deadline_s == 2.5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("device.local_epoch=2", "device.local_epoch: unknown key"),
        ("rounds=-1", "rounds: Input should be greater than 0 (got -1)"),
        ("patch.k=0", "patch.k: Input should be greater than 0 (got 0)"),
        ("runtime.participation=1.5", "runtime.participation: Input should be less than or equal to 1"),
        ("runtime.participation=0", "runtime.participation: Input should be greater than 0"),
        ("strategy=magic", "strategy: unknown strategy 'magic'; choose one of cloud_only, coda, dccl, fedavg"),
        ("data.source=/no/such/dir", "data.source: no such dataset directory or MovieLens file"),
        ("data.valid_frac=0.75", "leaves almost no training data"),
        ("runtime.devices_per_actor=0", "runtime.devices_per_actor"),
        ("metrics.bucket_quantiles=[0.5, 0.2]", "strictly increasing"),
        ("metrics.eval_devices=0", "metrics.eval_devices: Input should be greater than 0 or 'auto' (got 0)"),
        ("cloud.workers=0", "cloud.workers: Input should be greater than 0 or 'auto' (got 0)"),
        ("cloud.pretrain_budget=0", "cloud.pretrain_budget: Input should be greater than 0 (got 0)"),
        ("patch.bootstrap_table=dense", "patch.bootstrap_table: Input should be 'adam', 'lazy' or 'auto'"),
        ("data.eval_negatives_on_load=maybe", "data.eval_negatives_on_load: Input should be a valid boolean"),
        ("output.verbose=loud", "output.verbose: Input should be a valid boolean"),
        ("model.mlp_hidden=[]", "at least one hidden layer"),
        ("seed.x=1", "seed: Input should be a valid integer"),
        ("nokey", "expects KEY=VALUE"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value)


def test_bad_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("seed = [")
    with pytest.raises(ConfigError, match="does not parse"):
        load_config(broken)
    odd = tmp_path / "c.ini"
    odd.write_text("x")
    with pytest.raises(ConfigError, match=r"use \.toml"):
        load_config(odd)


def test_resolved_config_round_trips_through_json() -> None:
    config = load_config(None, ["seed=3", "data.num_devices=10"])
    assert SimConfig.model_validate_json(config.to_json()) == config
