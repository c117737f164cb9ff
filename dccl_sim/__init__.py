"""dccl-sim: a simulator of Device-Cloud Collaborative Learning for recommendation, on Ray and PyTorch.

The public API (everything else may change between releases; docs/architecture.md):

- `SimConfig`: every setting, validated (`SimConfig.model_validate(dict)`, or `load_config(file, ["key=value"])`).
- `run(config)`: run a simulation into `config.output.out_dir`; returns when every round is done.
- `Strategy`: the base class of an algorithm (device step, cloud step, broadcast, cost, columns).
- `Recommender`: the base class of a cloud model (features of a sample; the shared top MLP MetaPatch patches).
- `RoundContext`: the frozen round context every step receives (config, round, participants, random streams).
- `Observer`: hooks on the round loop (start, phase, round, end).
- `load_run(dir)`: a run's config and its rounds and devices tables (pandas when installed, else Arrow).
"""

from __future__ import annotations

from typing import Any

from dccl_sim.config import ConfigError, SimConfig, build_config, load_config
from dccl_sim.context import RoundContext
from dccl_sim.models.base import Recommender
from dccl_sim.results import RunResults, load_run
from dccl_sim.runtime.observers import Observer
from dccl_sim.strategies.base import Strategy

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Observer",
    "Recommender",
    "RoundContext",
    "RunResults",
    "SimConfig",
    "Strategy",
    "load_config",
    "load_run",
    "run",
]


def run(config: SimConfig | dict[str, Any], observers: list[Observer] | None = None) -> RunResults:
    """Run a simulation (a `SimConfig`, or a dict of settings validated into one) into `config.output.out_dir` and
    return its results. Ray is started and shut down here unless `runtime.backend = "local"` or an address is
    given; progress shows when `output.progress` is true."""
    from dccl_sim.runtime.session import run as run_session  # imports Ray only when a run starts

    config = config if isinstance(config, SimConfig) else build_config(config)
    state = run_session(config, extra_observers=observers)
    return load_run(state.out_dir)
