"""One Ray for several runs in one process: the points of a sweep (docs/design.md §7).

A point runs on the Ray its own `dccl-sim run` would have started: the same address, log level and cloud-worker
count (an embedded Ray counts one CPU per cloud worker beyond the cores, which sets the actors' thread counts and so
the numbers). Consecutive points that agree on these share one Ray; a point that differs gets a new one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from dccl_sim.config import SimConfig
from dccl_sim.runtime.base import Runtime
from dccl_sim.runtime.session import make_runtime

if TYPE_CHECKING:
    from dccl_sim.runtime.ray_runtime import RayRuntime


def _ray_start_settings(config: SimConfig) -> tuple[str | None, bool, int | str]:
    """What `RayRuntime` starts (or joins) Ray with for this config."""
    return config.runtime.address, config.output.verbose, config.cloud.workers


class SharedRay:
    """Hands each run its runtime: an in-process one anew, a Ray one that keeps Ray running after the run
    (`keep_ray`) until a run needs another Ray, or `close()`. A context manager that closes it."""

    def __init__(self) -> None:
        self._runtime: RayRuntime | None = None
        self._settings: tuple[str | None, bool, int | str] | None = None

    def runtime_for(self, config: SimConfig) -> Runtime:
        if config.runtime.backend == "local":
            return make_runtime(config)
        settings = _ray_start_settings(config)
        if self._runtime is None or settings != self._settings:
            self.close()
            self._runtime, self._settings = cast("RayRuntime", make_runtime(config, keep_ray=True)), settings
        return self._runtime

    def close(self) -> None:
        if self._runtime is not None:
            self._runtime.close()
        self._runtime, self._settings = None, None

    def __enter__(self) -> SharedRay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
