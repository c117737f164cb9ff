"""`ml100k`: MovieLens-100K from the RecBole wheel, fetched once into `data.cache_dir/ml-100k/`."""

from __future__ import annotations

from dccl_sim.data.movielens import load_ml100k
from dccl_sim.data.raw import RawDataset
from dccl_sim.data.sources.base import SourceRequest, data_source


@data_source("ml100k")
def ml100k(request: SourceRequest) -> RawDataset:
    """943 users, 1682 items, 100,000 ratings, profiles age/gender/occupation, genres as categories."""
    return load_ml100k(request.cache_dir)
