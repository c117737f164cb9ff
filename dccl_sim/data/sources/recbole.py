"""`recbole`: RecBole atomic files at `data.path`: `X.inter` with optional `X.user` and `X.item` beside it."""

from __future__ import annotations

from dccl_sim.data.movielens import load_recbole
from dccl_sim.data.raw import RawDataset
from dccl_sim.data.sources.base import SourceRequest, data_source


@data_source("recbole", reads_path=True)
def recbole(request: SourceRequest) -> RawDataset:
    """A folder holding one `<name>.inter`, or that file; see `load_recbole`."""
    return load_recbole(request.require_path())
