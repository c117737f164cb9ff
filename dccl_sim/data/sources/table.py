"""`table`: a plain interaction table at `data.path`: a `.csv` file, a `.parquet` file or a folder of Parquet files.

Columns (others are ignored):

* `user_id`, `item_id`: integers;
* `timestamp`: integers (seconds, or any unit: only the order matters), or a date/time type, read as whole seconds
  since the epoch;
* `category` (optional): the item's category, any values, coded 0, 1, ... over their sorted distinct values; an item
  must keep one category on all its rows. Without it every item is in one category.

Users get no profile fields: the models then read the history and the target alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from dccl_sim.data.raw import DataError, RawDataset
from dccl_sim.data.sources.base import SourceRequest, data_source

REQUIRED = ("user_id", "item_id", "timestamp")
CATEGORY = "category"
_SECONDS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


@data_source("table", reads_path=True)
def table(request: SourceRequest) -> RawDataset:
    """The interactions of the table; see the module docstring for its columns."""
    path = request.require_path()
    data = read_table(path)
    user_id = _integers(path, data, "user_id")
    item_id = _integers(path, data, "item_id")
    timestamp = _seconds(path, data)
    item_ids, item_of_row = np.unique(item_id, return_inverse=True)
    if CATEGORY in data.column_names:
        item_category, num_categories = _categories(path, data.column(CATEGORY), item_ids, item_of_row)
    else:
        item_category, num_categories = np.zeros(len(item_ids), dtype=np.int64), 1
    return RawDataset(
        name=path.stem,
        user_id=user_id,
        item_id=item_id,
        timestamp=timestamp,
        item_ids=item_ids,
        item_category=item_category,
        num_categories=num_categories,
        user_ids=np.unique(user_id),
    )


def read_table(path: Path) -> pa.Table:
    """The required columns, and `category` when there is one, of the CSV or Parquet table at `path`."""
    if path.is_dir() or path.suffix in (".parquet", ".pq"):
        file_format = "parquet"
    elif path.suffix == ".csv":
        file_format = "csv"
    else:
        raise DataError(f"{path}: expected a .csv or .parquet file, or a folder of Parquet files")
    try:
        dataset = pads.dataset(path, format=file_format)
        names = dataset.schema.names
        missing = [name for name in REQUIRED if name not in names]
        if missing:
            raise DataError(
                f"{path}: no column {', '.join(missing)}; a table needs {', '.join(REQUIRED)} "
                f"(it has {', '.join(names) or 'none'})"
            )
        return dataset.to_table(columns=[*REQUIRED, *([CATEGORY] if CATEGORY in names else [])])
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: cannot be read as {file_format} ({error})") from None


def _no_nulls(path: Path, column: pa.ChunkedArray, name: str) -> None:
    if column.null_count:
        raise DataError(f"{path}: column {name!r} has {column.null_count} empty values")


def _integers(path: Path, data: pa.Table, name: str) -> np.ndarray:
    column = data.column(name)
    _no_nulls(path, column, name)
    if not pa.types.is_integer(column.type):
        raise DataError(f"{path}: column {name!r} must hold integers, got {column.type}")
    return np.ascontiguousarray(column.to_numpy(), dtype=np.int64)


def _seconds(path: Path, data: pa.Table) -> np.ndarray:
    column = data.column("timestamp")
    if pa.types.is_date(column.type):
        column = column.cast(pa.timestamp("s"))
    if not pa.types.is_timestamp(column.type):
        return _integers(path, data, "timestamp")
    _no_nulls(path, column, "timestamp")
    # a timestamp's integer is a count of its unit since the epoch; floor division keeps whole seconds
    return np.ascontiguousarray(column.cast(pa.int64()).to_numpy(), dtype=np.int64) // _SECONDS[column.type.unit]


def _categories(
    path: Path, column: pa.ChunkedArray, item_ids: np.ndarray, item_of_row: np.ndarray
) -> tuple[np.ndarray, int]:
    """Each item's category code (over the sorted distinct values) and how many there are."""
    _no_nulls(path, column, CATEGORY)
    values = np.sort(pc.unique(column).to_numpy(zero_copy_only=False))
    code_of_row = np.searchsorted(values, column.to_numpy())
    item_category = np.empty(len(item_ids), dtype=np.int64)
    item_category[item_of_row] = code_of_row
    differs = np.flatnonzero(item_category[item_of_row] != code_of_row)
    if differs.size:  # the last row of an item wrote its code; an earlier row disagrees
        row = int(differs[0])
        names = values.tolist()  # Python values, for the message
        first, other = names[code_of_row[row]], names[item_category[item_of_row[row]]]
        raise DataError(
            f"{path}: item {item_ids[item_of_row[row]]} has two categories ({first!r} and {other!r}); "
            "a table gives each item one category"
        )
    return item_category, len(values)
