"""`synthetic`: the seeded long-tail generator (`dccl_sim.data.synthetic`), `data.synthetic` its settings."""

from __future__ import annotations

from dccl_sim.data.raw import RawDataset
from dccl_sim.data.sources.base import SourceRequest, data_source
from dccl_sim.data.synthetic import generate_synthetic

DEFAULT_DEVICES = 1000
"""Devices generated when neither the caller nor `data.num_devices` says how many."""


@data_source("synthetic")
def synthetic(request: SourceRequest) -> RawDataset:
    """`num_devices` users drawn from the run's seed."""
    return generate_synthetic(
        request.config.synthetic, request.num_devices or DEFAULT_DEVICES, request.seed, request.on_progress
    )
