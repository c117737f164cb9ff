"""Data sources, one file each, registered by name with `@data_source` (docs/design.md §2, §8).

`data.source` picks one: `ml100k`, `synthetic`, `movielens` / `recbole` / `table` (reading `data.path`), or a user's
`module:function`. A new built-in is one file here; see `base.py` for the contract.
"""

from dccl_sim.data.sources.base import DataSource, SourceRequest, data_source

__all__ = ["DataSource", "SourceRequest", "data_source"]
