"""`movielens`: the standard MovieLens files at `data.path` (ml-100k `u.data`, ml-1m `ratings.dat`, ml-20m and
ml-latest `ratings.csv`, or RecBole atomic files), the format following the file names.

A bare path in `data.source` (the form before `data.path`) is read by this source too.
"""

from __future__ import annotations

from dccl_sim.data.movielens import load_movielens
from dccl_sim.data.raw import RawDataset
from dccl_sim.data.sources.base import SourceRequest, data_source


@data_source("movielens", reads_path=True)
def movielens(request: SourceRequest) -> RawDataset:
    """A MovieLens folder or its ratings file; see `load_movielens`."""
    return load_movielens(request.require_path())
