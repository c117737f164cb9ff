"""What every data source produces: raw interactions plus side information, before samples are built."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class DataError(ValueError):
    """A dataset that cannot be used as it is; the message says which file or field and why."""


@dataclass(frozen=True)
class RawDataset:
    """Interactions with raw ids, as a source delivers them.

    `item_category[i]` is the category code (0..num_categories-1) of item `item_ids[i]`;
    `profiles[name][u]` the code (0..profile_cardinalities[name]-1) of field `name` for user `user_ids[u]`.
    Items that appear in interactions but not in `item_ids`, and users without a profile, are errors.
    """

    name: str
    user_id: np.ndarray
    item_id: np.ndarray
    timestamp: np.ndarray
    item_ids: np.ndarray
    item_category: np.ndarray
    num_categories: int
    user_ids: np.ndarray
    profiles: dict[str, np.ndarray] = field(default_factory=dict)
    profile_cardinalities: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.user_id)
        if n == 0:
            raise DataError(f"{self.name}: no interactions")
        if len(self.item_id) != n or len(self.timestamp) != n:
            raise DataError(f"{self.name}: user_id, item_id and timestamp must have the same length")
        if len(self.item_category) != len(self.item_ids):
            raise DataError(f"{self.name}: one category per item expected")
        if len(self.item_category) and (
            self.item_category.min() < 0 or self.item_category.max() >= self.num_categories
        ):
            raise DataError(f"{self.name}: item categories must lie in 0..{self.num_categories - 1}")
        if set(self.profiles) != set(self.profile_cardinalities):
            raise DataError(f"{self.name}: every profile field needs a cardinality")
        for name, codes in self.profiles.items():
            if len(codes) != len(self.user_ids):
                raise DataError(f"{self.name}: profile field {name!r} must have one code per user")
            if len(codes) and (codes.min() < 0 or codes.max() >= self.profile_cardinalities[name]):
                raise DataError(
                    f"{self.name}: profile field {name!r} codes must lie in 0..{self.profile_cardinalities[name] - 1}"
                )
