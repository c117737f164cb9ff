"""Settings that only matter at scale choose themselves from the dataset's size (docs/scale-out.md, "Scale without
knobs"): each is `auto` by default, resolved here, written resolved into the run's `config.json`, and an explicit
value is always honoured. Below the thresholds `auto` is exactly the setting runs had before it existed, so small
runs (ML-100K, the reference runs, the published tables) are unchanged.
"""

from __future__ import annotations

from dccl_sim.config import DataConfig, SimConfig

ON_LOAD_ABOVE_DEVICES = 20_000
"""`data.eval_negatives_on_load = auto`: drawn on load above this many requested devices (`data.num_devices`).
Stored, 99 negatives per evaluation positive are ~95% of a dataset's rows: ~6 × 10^7 at 10^5 synthetic devices, whose
build took minutes and whose shards every actor reads. Decided from the request, before any data exists, so that the
dataset's cache key is the same whether the value was `auto` or written out; a source asked for all its users
(`num_devices` unset) keeps them stored."""

LAZY_TABLE_ABOVE_DEVICES = 10_000
"""`patch.bootstrap_table = auto`: `lazy` above this many devices, else `adam`. A dense Adam step moves every row of
the per-device θ table: ~0.13 s at 10^6 rows, 36 minutes an epoch (experiments/bench/NOTES.md)."""

EVAL_SAMPLE_DEVICES = 10_000
"""`metrics.eval_devices = auto`: every device up to this many, else a fixed seeded sample of this many. Scoring
every device's candidates with three models a round would otherwise dominate a 10^5-device round."""


def eval_negatives_on_load(config: DataConfig) -> bool:
    """`data.eval_negatives_on_load` resolved."""
    if config.eval_negatives_on_load != "auto":
        return config.eval_negatives_on_load
    return config.num_devices is not None and config.num_devices > ON_LOAD_ABOVE_DEVICES


def before_data(config: SimConfig) -> SimConfig:
    """`config` with what the dataset's build depends on resolved (it does not know the dataset's size yet)."""
    if config.data.eval_negatives_on_load != "auto":
        return config
    data = config.data.model_copy(update={"eval_negatives_on_load": eval_negatives_on_load(config.data)})
    return config.model_copy(update={"data": data})


def for_dataset(config: SimConfig, num_devices: int) -> SimConfig:
    """`config` with every `auto` resolved for a dataset of `num_devices` devices (idempotent)."""
    config = before_data(config)
    if config.patch.bootstrap_table == "auto":
        table = "lazy" if num_devices > LAZY_TABLE_ABOVE_DEVICES else "adam"
        config = config.model_copy(update={"patch": config.patch.model_copy(update={"bootstrap_table": table})})
    if config.metrics.eval_devices == "auto":
        sample = EVAL_SAMPLE_DEVICES if num_devices > EVAL_SAMPLE_DEVICES else None
        config = config.model_copy(update={"metrics": config.metrics.model_copy(update={"eval_devices": sample})})
    return config
